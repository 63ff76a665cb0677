import { Miosa } from '@stasis/sdk';
const client = new Miosa();
// Create a snapshot
const snap = await client.snapshots.create(computerId, {
comment: 'before-deploy-v2',
});
// Poll until ready
let status = snap.status;
while (status !== 'ready') {
await new Promise(r => setTimeout(r, 3000));
const updated = await client.snapshots.get(computerId, snap.id);
status = updated.status;
}
// Restore — creates a new computer from the snapshot
const restored = await client.snapshots.restore(computerId, snap.id);
console.log(`Restored computer: ${restored.id}`);

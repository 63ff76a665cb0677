import { Miosa } from '@stasis/sdk'; // ADDED (not in the recipe): the import
const client = new Miosa(); // ADDED (not in the recipe): the client the recipe assumes
// Build a baseline environment once, clone it N times for parallel jobs
const baseline = await client.snapshots.create(setupComputerId, {
comment: 'baseline-env',
});
// Each restore creates an independent computer from the same state
const workers = await Promise.all(
Array.from({ length: 5 }, () =>
client.snapshots.restore(setupComputerId, baseline.id)
)
);
export { baseline, workers }; // ADDED (not in the recipe): lets a caller check the result

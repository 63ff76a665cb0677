-- What each host of a cluster runs (its QEMU release, KVM, its KVM machines' CPU model), as
-- JSON from its heartbeats: the control plane places a restore only where it can load.
ALTER TABLE hosts ADD COLUMN machine TEXT;

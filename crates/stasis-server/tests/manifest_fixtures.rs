//! Manifests as every earlier version of the platform wrote them (one real snapshot each, of an
//! `xs` computer, unencrypted; only the manifest is kept, not the chunks): each still reads,
//! and its machine record either describes a machine a host can be checked against, or is
//! the older record a restore matches with the image it was taken on, refusing with a
//! message that names the image otherwise.
//!
//! - `manifest-v1.zst`: written by `3d0be9e` (before chunk naming was recorded);
//! - `manifest-v2.zst`: written by `e84032e` (chunk names per tenant, no machine description);
//! - `manifest-v3.zst`: written with machine descriptions and boot files, on QEMU 10.0.

use stasis_store::{ChunkNames, Manifest};
use stasis_vmm::description::{Described, HostMachine, Mismatch, QemuRelease};
use stasis_vmm::Accel;

fn fixture(name: &str) -> Manifest {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    Manifest::decode(&std::fs::read(&path).unwrap()).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn host(major: u32, minor: u32) -> HostMachine {
    HostMachine::tcg(QemuRelease { major, minor })
}

#[test]
fn manifests_of_every_earlier_version_read_and_say_how_they_restore() {
    for (name, version, names, image) in [
        ("manifest-v1.zst", 1, ChunkNames::Blake3, "9be9e8b32cb262bc"),
        ("manifest-v2.zst", 2, ChunkNames::TenantKeyed, "1411b4ae4b7edb34"),
    ] {
        let m = fixture(name);
        assert_eq!((m.version, m.chunk_names), (version, names), "{name}");
        assert!(m.boot.is_none(), "{name} predates boot files");
        assert_eq!((m.memory.size, m.disk.size), (256 << 20, 2 << 30), "{name}");
        let Ok(Described::Legacy(legacy)) = Described::parse(&m.machine) else {
            panic!("{name}: its machine record reads as the older kind: {}", m.machine)
        };
        assert_eq!((legacy.vcpus, legacy.memory_mib, legacy.accel), (1, 256, Accel::Tcg));
        assert_eq!(legacy.image_id, image);
        // With the image it was taken on still here, it restores; without, it is refused
        // with a message naming that image.
        assert_eq!(legacy.check(&host(10, 0), image), Ok(()), "{name}");
        let refused = legacy.check(&host(10, 0), "0123456789abcdef").unwrap_err();
        assert!(
            matches!(&refused, Mismatch::Image { taken_on, .. } if taken_on == image),
            "{name}"
        );
        let refused = refused.to_string();
        assert!(
            refused.contains(&format!("taken on image {image}")) && refused.contains("0123456789abcdef"),
            "{name}: {refused}"
        );
    }

    let m = fixture("manifest-v3.zst");
    assert_eq!((m.version, m.chunk_names), (3, ChunkNames::TenantKeyed));
    let boot = m.boot.as_ref().expect("version 3 carries the boot files");
    let Ok(Described::Current(d)) = Described::parse(&m.machine) else {
        panic!("a version 3 manifest describes its machine: {}", m.machine)
    };
    assert_eq!((boot.kernel.size, boot.initrd.size), (d.kernel.bytes, d.initrd.bytes));
    assert_eq!(
        (d.vcpus, d.memory_mib, d.accel, d.cpu_model.as_str()),
        (1, 256, Accel::Tcg, "max")
    );
    assert_eq!(d.qemu, QemuRelease { major: 10, minor: 0 });
    assert_eq!(d.check(&host(10, 0)), Ok(()));
    let refused = d.check(&host(7, 2)).unwrap_err();
    assert!(matches!(refused, Mismatch::Qemu { .. }));
    assert!(
        refused
            .to_string()
            .contains("taken on QEMU 10.0; this host runs QEMU 7.2"),
        "{refused}"
    );
}

//! The write tracker under KVM: pages a *KVM guest* writes (through EPT, not through the
//! host's own stores) are reported by the userfaultfd tracker ferry uses on the source.
//!
//! /dev/kvm on the development machines is a nested `kvm-pvm` that cannot boot Linux but
//! runs real-mode code: a VM with one vCPU whose memory is a `MAP_SHARED` RAM file (as
//! QEMU's `memory-backend-file`), a few bytes of code writing two pages, run once before
//! the tracker is armed (so KVM holds writable mappings) and once after. Where /dev/kvm is
//! missing the test says so and checks nothing.

use ferry_memory::{DirtyTracker, RamFile, UffdTracker, PAGE_SIZE};
use kvm_ioctls::{Kvm, VcpuExit};

const PAGES: u64 = 16;
const CODE_PAGE: u64 = 1;
/// The pages the guest writes: 0x2000 and 0x3000.
const GUEST_WRITES: [u64; 2] = [2, 3];

/// `mov al, value; mov [0x2000], al; mov [0x3000], al; hlt` (16-bit real mode).
fn code(value: u8) -> Vec<u8> {
    vec![0xB0, value, 0xA2, 0x00, 0x20, 0xA2, 0x00, 0x30, 0xF4]
}

fn run_to_hlt(vcpu: &mut kvm_ioctls::VcpuFd) {
    let mut sregs = vcpu.get_sregs().expect("sregs");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = 0;
    sregs.ds.selector = 0;
    vcpu.set_sregs(&sregs).expect("set sregs");
    let mut regs = vcpu.get_regs().expect("regs");
    regs.rip = CODE_PAGE * PAGE_SIZE as u64;
    regs.rflags = 2;
    vcpu.set_regs(&regs).expect("set regs");
    for _ in 0..16 {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::Hlt => return,
            VcpuExit::IoOut(..) | VcpuExit::IoIn(..) => continue,
            other => panic!("unexpected vCPU exit {other:?}"),
        }
    }
    panic!("the guest did not reach hlt");
}

#[test]
fn uffd_tracker_reports_pages_a_kvm_guest_writes() {
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("SKIPPED: /dev/kvm unavailable here ({e}): nothing checked");
            return;
        }
    };
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let shm =
        std::path::Path::new("/dev/shm").join(format!("ferry-kvm-tracker-{}", std::process::id()));
    let _ = std::fs::remove_file(&shm);
    let ram = RamFile::create(&shm, PAGES * PAGE_SIZE as u64).expect("RAM file");
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: ram.len(),
        userspace_addr: ram.mapping_addr() as u64,
    };
    // SAFETY: the mapping is valid for the region's whole size and outlives the VM.
    unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");
    let mut page = vec![0u8; PAGE_SIZE];
    page[..9].copy_from_slice(&code(0x42));
    ram.write_page(CODE_PAGE, &page).expect("code");
    let mut vcpu = vm.create_vcpu(0).expect("vCPU");

    // First run: KVM maps the guest's pages writable.
    run_to_hlt(&mut vcpu);
    let mut seen = vec![0u8; PAGE_SIZE];
    ram.read_page(2, &mut seen).expect("read");
    assert_eq!(seen[0], 0x42, "the guest wrote page 2 (through KVM)");

    // Host writes the code before arming (not counted), then arms the tracker.
    page[..9].copy_from_slice(&code(0x43));
    ram.write_page(CODE_PAGE, &page).expect("code");
    let mut tracker =
        UffdTracker::attach_self(ram.mapping_addr(), ram.len() as usize, 0).expect("tracker");
    tracker.arm().expect("arm");
    let idle = tracker.collect().expect("collect");
    assert_eq!(idle.count(), 0, "nothing written since arming");

    // Second run: the guest writes pages 2 and 3 again; the host writes nothing.
    run_to_hlt(&mut vcpu);
    let got = tracker.collect().expect("collect");
    let reported: Vec<u64> = (0..PAGES).filter(|&p| got.get(p)).collect();
    eprintln!("pages reported after the guest's run: {reported:?}");
    for p in GUEST_WRITES {
        assert!(
            got.get(p),
            "page {p} written by the KVM guest was not reported: {reported:?}"
        );
    }
    assert!(
        reported
            .iter()
            .all(|p| GUEST_WRITES.contains(p) || *p == CODE_PAGE),
        "only what the guest wrote (the code page may show as accessed-for-write): {reported:?}"
    );
    ram.read_page(3, &mut seen).expect("read");
    assert_eq!(seen[0], 0x43, "the second run's value");
    tracker.disarm().expect("disarm");
    drop(tracker);
    drop(vcpu);
    drop(vm);
    drop(ram);
    let _ = std::fs::remove_file(&shm);
}

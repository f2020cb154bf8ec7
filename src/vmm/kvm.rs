//! Opening /dev/kvm and checking, at start-up, every capability ringvm relies on.

use kvm_ioctls::{Cap, Kvm};

/// Errors from opening KVM.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("{0} does not exist: load the kvm module (modprobe kvm_intel or kvm_amd) or enable virtualization")]
    Missing(String),
    #[error("{0} is not accessible: run as root or add the user to the kvm group")]
    Permission(String),
    #[error("Cannot open {0} as a KVM device")]
    Open(String, #[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not the supported version 12")]
    ApiVersion(i32),
    #[error("{0} is not a KVM device (KVM_GET_API_VERSION failed)")]
    NotKvm(String),
    #[error("KVM lacks a required capability: {0}")]
    MissingCap(&'static str),
}

const REQUIRED: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::IrqRouting, "KVM_CAP_IRQ_ROUTING"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::MpState, "KVM_CAP_MP_STATE"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
];

/// The KVM device: /dev/kvm, or `RINGVM_KVM_DEVICE` (for tests of the start-up checks).
fn device_path() -> String {
    std::env::var("RINGVM_KVM_DEVICE").unwrap_or_else(|_| "/dev/kvm".to_string())
}

/// Opens /dev/kvm and checks the API version and the capabilities ringvm needs.
pub fn open() -> Result<Kvm, KvmError> {
    let path = device_path();
    let cpath =
        std::ffi::CString::new(path.clone()).map_err(|_| KvmError::Missing(path.clone()))?;
    let kvm = Kvm::new_with_path(&cpath).map_err(|e| match e.errno() {
        libc::ENOENT => KvmError::Missing(path.clone()),
        libc::EACCES | libc::EPERM => KvmError::Permission(path.clone()),
        _ => KvmError::Open(path.clone(), e),
    })?;
    let v = kvm.get_api_version();
    if v < 0 {
        return Err(KvmError::NotKvm(path));
    }
    if v != 12 {
        return Err(KvmError::ApiVersion(v));
    }
    for (cap, name) in REQUIRED {
        if !kvm.check_extension(*cap) {
            return Err(KvmError::MissingCap(name));
        }
    }
    Ok(kvm)
}

/// Largest vCPU count KVM allows for one VM.
pub fn max_vcpus(kvm: &Kvm) -> usize {
    kvm.get_max_vcpus()
}

vmm_sys_util::ioctl_io_nr!(KVM_GET_TSC_KHZ, kvm_bindings::KVMIO, 0xa3);

/// The TSC rate new vCPUs of `vm` get (KVM_GET_TSC_KHZ on the VM, Linux 6.0+), if known.
pub fn vm_tsc_khz(vm: &kvm_ioctls::VmFd) -> Option<u32> {
    // SAFETY: KVM_GET_TSC_KHZ takes no argument and returns the rate (or -1 with errno);
    // `vm` is an open VM file descriptor for the duration of the call.
    let khz = unsafe { vmm_sys_util::ioctl::ioctl(vm, KVM_GET_TSC_KHZ()) };
    u32::try_from(khz).ok().filter(|k| *k > 0)
}

//! Help for this lab's nested KVM, whose ring-0 instruction emulator gives up on a few
//! instructions (KVM_EXIT_INTERNAL_ERROR, suberror EMULATION, with the instruction bytes).
//! ringvm completes a small documented set itself and stops with a clear message on any
//! other:
//!
//! | bytes | instruction | what ringvm does |
//! |-------|-------------|------------------|
//! | `cc`  | `int3`      | injects #BP (KVM_SET_VCPU_EVENTS) with RIP past the int3, as the CPU would |
//! | anything else | — | stops the VM naming RIP, the bytes and the mnemonic |

/// KVM_INTERNAL_ERROR_EMULATION.
pub const SUBERROR_EMULATION: u32 = 1;
/// KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES.
const FLAG_INSTRUCTION_BYTES: u64 = 1;

/// The instruction bytes KVM reported with an emulation failure, if it did.
/// Layout (`kvm_run.emulation_failure`): data[0] = flags, then `insn_size: u8` followed by
/// up to 15 bytes.
pub fn failing_instruction(suberror: u32, data: &[u64]) -> Option<Vec<u8>> {
    if suberror != SUBERROR_EMULATION || data.len() < 3 || data[0] & FLAG_INSTRUCTION_BYTES == 0 {
        return None;
    }
    let mut raw = Vec::with_capacity(16);
    for w in &data[1..3] {
        raw.extend_from_slice(&w.to_le_bytes());
    }
    let size = (raw[0] as usize).min(15);
    Some(raw[1..1 + size].to_vec())
}

/// A short name for the instruction at the start of `bytes` (for error messages).
pub fn mnemonic(bytes: &[u8]) -> &'static str {
    let mut i = 0;
    // Skip legacy prefixes and REX.
    while i < bytes.len() && matches!(bytes[i], 0xf0 | 0xf2 | 0xf3 | 0x66 | 0x67 | 0x2e | 0x3e | 0x26 | 0x36 | 0x64 | 0x65 | 0x40..=0x4f) {
        i += 1;
    }
    let b = &bytes[i.min(bytes.len())..];
    let reg = |m: u8| (m >> 3) & 7;
    match b {
        [0xcc, ..] => "int3",
        [0xcd, ..] => "int imm8",
        [0x0f, 0xc7, m, ..] if reg(*m) == 1 => "cmpxchg8b/cmpxchg16b",
        [0x0f, 0xae, m, ..] if reg(*m) == 5 && *m < 0xc0 => "xrstor",
        [0x0f, 0xae, m, ..] if reg(*m) == 4 && *m < 0xc0 => "xsave",
        [0x0f, 0xc7, m, ..] if reg(*m) == 4 => "xsavec",
        [0x0f, 0x01, 0xd0, ..] => "xgetbv",
        [0x0f, 0x01, 0xd1, ..] => "xsetbv",
        [0x0f, 0x0b, ..] => "ud2",
        [0x0f, 0xa2, ..] => "cpuid",
        [0x0f, 0x30, ..] => "wrmsr",
        [0x0f, 0x32, ..] => "rdmsr",
        _ => "unknown",
    }
}

/// What to do about a failed emulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fixup {
    /// Deliver #BP to the guest with RIP advanced past the one-byte int3.
    InjectBreakpoint,
}

/// The fix-up for `bytes`, or `None` when ringvm cannot complete the instruction.
pub fn fixup(bytes: &[u8]) -> Option<Fixup> {
    match bytes.first() {
        Some(0xcc) => Some(Fixup::InjectBreakpoint),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exit a Debian 6.1 kernel produced here at its int3 self-test.
    const OBSERVED: [u64; 8] = [1, 0x7c83_9090_9090_cc0f, 0x480b_0f02_7401_0424, 0x1000, 0, 0, 0, 0];

    #[test]
    fn test_failing_instruction_decodes_observed_int3() {
        let bytes = failing_instruction(1, &OBSERVED).unwrap();
        assert_eq!(bytes.len(), 15);
        assert_eq!(&bytes[..3], &[0xcc, 0x90, 0x90]);
        assert_eq!(mnemonic(&bytes), "int3");
        assert_eq!(fixup(&bytes), Some(Fixup::InjectBreakpoint));
    }

    #[test]
    fn test_failing_instruction_without_bytes_is_none() {
        assert_eq!(failing_instruction(1, &[0, 0, 0]), None);
        assert_eq!(failing_instruction(2, &OBSERVED), None);
    }

    #[test]
    fn test_mnemonics_for_known_blockers() {
        assert_eq!(mnemonic(&[0xf0, 0x48, 0x0f, 0xc7, 0x0e]), "cmpxchg8b/cmpxchg16b");
        assert_eq!(mnemonic(&[0x48, 0x0f, 0xae, 0x2f]), "xrstor");
        assert_eq!(mnemonic(&[0x0f, 0x01, 0xd1]), "xsetbv");
        assert_eq!(mnemonic(&[0x90]), "unknown");
        assert_eq!(fixup(&[0x0f, 0xae, 0x2f]), None);
    }
}

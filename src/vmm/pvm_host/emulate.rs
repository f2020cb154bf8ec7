//! Help for this lab's nested KVM, whose ring-0 instruction emulator gives up on a few
//! instructions (KVM_EXIT_INTERNAL_ERROR, suberror EMULATION, with the instruction bytes).
//! ringvm completes a small documented set itself and stops with a clear message on any
//! other:
//!
//! | bytes | instruction | what ringvm does |
//! |-------|-------------|------------------|
//! | `cc`  | `int3`      | injects #BP (KVM_SET_VCPU_EVENTS) with RIP past the int3, as the CPU would |
//! | `[f0] REX.W 0f c7 /1` | `lock cmpxchg16b m128` (and `cmpxchg8b m64` without REX.W) | translates the operand's address (KVM_TRANSLATE), performs the compare-exchange atomically on guest memory with the host's own `lock cmpxchg16b`, updates RAX/RDX and ZF, advances RIP |
//! | `0f 01 ca` / `0f 01 cb` | `clac` / `stac` | clears / sets RFLAGS.AC, advances RIP |
//! | `9b` | `fwait` | steps over it: it only raises pending unmasked x87 exceptions, and the x87 state KVM keeps for the vCPU has none while ring 0 is emulated (Linux runs `fninit; fwait` at FPU init) |
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
    while i < bytes.len()
        && matches!(
            bytes[i],
            0xf0 | 0xf2 | 0xf3 | 0x66 | 0x67 | 0x2e | 0x3e | 0x26 | 0x36 | 0x64 | 0x65 | 0x40
                ..=0x4f
        )
    {
        i += 1;
    }
    let b = &bytes[i.min(bytes.len())..];
    let reg = |m: u8| (m >> 3) & 7;
    match b {
        [0xcc, ..] => "int3",
        [0xcd, ..] => "int imm8",
        [0x9b, ..] => "fwait",
        [0x0f, 0xb8, ..] => "popcnt",
        [0x0f, 0xc7, m, ..] if reg(*m) == 1 => "cmpxchg8b/cmpxchg16b",
        [0x0f, 0xae, m, ..] if reg(*m) == 5 && *m < 0xc0 => "xrstor",
        [0x0f, 0xae, m, ..] if reg(*m) == 4 && *m < 0xc0 => "xsave",
        [0x0f, 0xc7, m, ..] if reg(*m) == 4 => "xsavec",
        [0x0f, 0x01, 0xca, ..] => "clac",
        [0x0f, 0x01, 0xcb, ..] => "stac",
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
    /// Perform a `cmpxchg8b`/`cmpxchg16b` on the memory operand.
    CompareExchange(CmpXchg),
    /// `clac` (false) or `stac` (true): set RFLAGS.AC and step over the 3 bytes.
    SetAc(bool),
    /// An instruction with no architectural effect here (`fwait`): step over `len` bytes.
    Skip { len: u8 },
}

/// RFLAGS.AC, the alignment-check / SMAP override flag.
pub const RFLAGS_AC: u64 = 1 << 18;

/// Segment override of a memory operand (only FS and GS have bases in 64-bit mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    None,
    Fs,
    Gs,
}

/// A decoded `cmpxchg8b/16b` memory operand: `seg:[base + index*scale + disp]`, or
/// RIP-relative.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CmpXchg {
    /// 16 for cmpxchg16b, 8 for cmpxchg8b.
    pub width: u8,
    /// Instruction length in bytes.
    pub len: u8,
    pub base: Option<u8>,
    pub index: Option<(u8, u8)>,
    pub disp: i64,
    pub rip_relative: bool,
    pub segment: Segment,
}

/// Decodes `[prefixes] [REX] 0f c7 /1 modrm [sib] [disp]` in 64-bit mode.
pub fn decode_cmpxchg(bytes: &[u8]) -> Option<CmpXchg> {
    let mut i = 0;
    let mut segment = Segment::None;
    while let Some(&b) = bytes.get(i) {
        match b {
            0xf0 | 0x2e | 0x3e | 0x26 | 0x36 => {}
            0x64 => segment = Segment::Fs,
            0x65 => segment = Segment::Gs,
            _ => break,
        }
        i += 1;
    }
    let mut rex = 0u8;
    if let Some(&b @ 0x40..=0x4f) = bytes.get(i) {
        rex = b;
        i += 1;
    }
    if bytes.get(i..i + 2)? != [0x0f, 0xc7] {
        return None;
    }
    i += 2;
    let modrm = *bytes.get(i)?;
    i += 1;
    let (md, reg, rm) = (modrm >> 6, (modrm >> 3) & 7, modrm & 7);
    if md == 3 || reg != 1 {
        return None;
    }
    let (rex_b, rex_x) = ((rex & 1) << 3, ((rex >> 1) & 1) << 3);
    let mut base = Some(rm | rex_b);
    let mut index = None;
    let mut rip_relative = false;
    let mut disp_len = match md {
        1 => 1,
        2 => 4,
        _ => 0,
    };
    if rm == 4 {
        let sib = *bytes.get(i)?;
        i += 1;
        let idx = ((sib >> 3) & 7) | rex_x;
        if idx != 4 {
            index = Some((idx, 1u8 << (sib >> 6)));
        }
        base = Some((sib & 7) | rex_b);
        if sib & 7 == 5 && md == 0 {
            base = None;
            disp_len = 4;
        }
    } else if rm == 5 && md == 0 {
        base = None;
        rip_relative = true;
        disp_len = 4;
    }
    let disp = match disp_len {
        1 => *bytes.get(i)? as i8 as i64,
        4 => i32::from_le_bytes(bytes.get(i..i + 4)?.try_into().ok()?) as i64,
        _ => 0,
    };
    i += disp_len;
    let width = if rex & 0x08 != 0 { 16 } else { 8 };
    Some(CmpXchg {
        width,
        len: i as u8,
        base,
        index,
        disp,
        rip_relative,
        segment,
    })
}

/// General-purpose register `n` (0 = RAX … 15 = R15).
pub fn gpr(regs: &kvm_bindings::kvm_regs, n: u8) -> u64 {
    [
        regs.rax, regs.rcx, regs.rdx, regs.rbx, regs.rsp, regs.rbp, regs.rsi, regs.rdi, regs.r8,
        regs.r9, regs.r10, regs.r11, regs.r12, regs.r13, regs.r14, regs.r15,
    ][n as usize & 15]
}

impl CmpXchg {
    /// The operand's linear address.
    pub fn address(&self, regs: &kvm_bindings::kvm_regs, fs_base: u64, gs_base: u64) -> u64 {
        let mut a = self.disp as u64;
        if self.rip_relative {
            a = a.wrapping_add(regs.rip).wrapping_add(self.len as u64);
        }
        if let Some(b) = self.base {
            a = a.wrapping_add(gpr(regs, b));
        }
        if let Some((i, scale)) = self.index {
            a = a.wrapping_add(gpr(regs, i).wrapping_mul(scale as u64));
        }
        match self.segment {
            Segment::Fs => a.wrapping_add(fs_base),
            Segment::Gs => a.wrapping_add(gs_base),
            Segment::None => a,
        }
    }
}

/// Atomically compares the `width` bytes at `ptr` with `expected` and, if equal, stores
/// `new`; returns (swapped, the value found).
///
/// # Safety
/// `ptr` must be valid for reads and writes of `width` bytes and aligned to `width`.
pub unsafe fn compare_exchange(ptr: *mut u8, width: u8, expected: u128, new: u128) -> (bool, u128) {
    if width == 8 {
        // SAFETY: the caller guarantees an aligned, valid 8-byte location.
        let atomic = unsafe { &*(ptr as *const std::sync::atomic::AtomicU64) };
        return match atomic.compare_exchange(
            expected as u64,
            new as u64,
            std::sync::atomic::Ordering::SeqCst,
            std::sync::atomic::Ordering::SeqCst,
        ) {
            Ok(v) => (true, v as u128),
            Err(v) => (false, v as u128),
        };
    }
    let (mut lo, mut hi) = (expected as u64, (expected >> 64) as u64);
    let ok: u8;
    // rbx is reserved by LLVM, so the new low half is swapped into it around the instruction.
    // SAFETY: the caller guarantees an aligned, valid 16-byte location; x86-64 KVM hosts have cx16.
    unsafe {
        std::arch::asm!(
            "xchg {nlo}, rbx",
            "lock cmpxchg16b [{p}]",
            "sete {ok}",
            "xchg {nlo}, rbx",
            p = in(reg) ptr,
            nlo = inout(reg) new as u64 => _,
            ok = out(reg_byte) ok,
            inout("rax") lo,
            inout("rdx") hi,
            in("rcx") (new >> 64) as u64,
        );
    }
    (ok != 0, (hi as u128) << 64 | lo as u128)
}

/// The fix-up for `bytes`, or `None` when ringvm cannot complete the instruction.
pub fn fixup(bytes: &[u8]) -> Option<Fixup> {
    match bytes {
        [0xcc, ..] => Some(Fixup::InjectBreakpoint),
        [0x0f, 0x01, 0xca, ..] => Some(Fixup::SetAc(false)),
        [0x0f, 0x01, 0xcb, ..] => Some(Fixup::SetAc(true)),
        [0x9b, ..] => Some(Fixup::Skip { len: 1 }),
        _ => decode_cmpxchg(bytes).map(Fixup::CompareExchange),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exit a Debian 6.1 kernel produced here at its int3 self-test.
    const OBSERVED: [u64; 8] = [
        1,
        0x7c83_9090_9090_cc0f,
        0x480b_0f02_7401_0424,
        0x1000,
        0,
        0,
        0,
        0,
    ];

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
    fn test_decode_lock_cmpxchg16b_with_base_and_disp8() {
        // lock cmpxchg16b 0x10(%rsi)
        let c = decode_cmpxchg(&[0xf0, 0x48, 0x0f, 0xc7, 0x4e, 0x10, 0x90]).unwrap();
        assert_eq!(
            (c.width, c.len, c.base, c.index, c.disp),
            (16, 6, Some(6), None, 0x10)
        );
        let regs = kvm_bindings::kvm_regs {
            rsi: 0x1000,
            ..Default::default()
        };
        assert_eq!(c.address(&regs, 0, 0), 0x1010);
    }

    #[test]
    fn test_decode_cmpxchg16b_sib_gs_and_rex_extensions() {
        // lock cmpxchg16b %gs:0x100(%r8,%r9,8): 65 f0 4b 0f c7 8c c8 00 01 00 00
        let c = decode_cmpxchg(&[
            0x65, 0xf0, 0x4b, 0x0f, 0xc7, 0x8c, 0xc8, 0x00, 0x01, 0x00, 0x00,
        ])
        .unwrap();
        assert_eq!(
            (c.base, c.index, c.disp, c.segment, c.len),
            (Some(8), Some((9, 8)), 0x100, Segment::Gs, 11)
        );
        let regs = kvm_bindings::kvm_regs {
            r8: 0x2000,
            r9: 2,
            ..Default::default()
        };
        assert_eq!(
            c.address(&regs, 0, 0x10_0000),
            0x10_0000 + 0x2000 + 16 + 0x100
        );
    }

    #[test]
    fn test_decode_cmpxchg8b_rip_relative() {
        // cmpxchg8b 0x20(%rip): 0f c7 0d 20 00 00 00
        let c = decode_cmpxchg(&[0x0f, 0xc7, 0x0d, 0x20, 0, 0, 0]).unwrap();
        assert_eq!((c.width, c.len, c.rip_relative), (8, 7, true));
        let regs = kvm_bindings::kvm_regs {
            rip: 0x5000,
            ..Default::default()
        };
        assert_eq!(c.address(&regs, 0, 0), 0x5000 + 7 + 0x20);
    }

    #[test]
    fn test_decode_rejects_register_operand_and_other_groups() {
        assert_eq!(decode_cmpxchg(&[0x48, 0x0f, 0xc7, 0xc8]), None, "mod=3");
        assert_eq!(
            decode_cmpxchg(&[0x48, 0x0f, 0xc7, 0x36]),
            None,
            "/6 is rdrand/vmptrld"
        );
        assert_eq!(decode_cmpxchg(&[0x48, 0x0f, 0xc7]), None, "truncated");
    }

    #[test]
    fn test_compare_exchange_16_swaps_only_on_match() {
        #[repr(align(16))]
        struct Cell([u8; 16]);
        let mut cell = Cell([0; 16]);
        cell.0[..8].copy_from_slice(&1u64.to_le_bytes());
        cell.0[8..].copy_from_slice(&2u64.to_le_bytes());
        let p = cell.0.as_mut_ptr();
        // SAFETY: p points at 16 aligned bytes owned by this test.
        let (ok, old) = unsafe { compare_exchange(p, 16, 5, 9) };
        assert!(!ok);
        assert_eq!(old, 2u128 << 64 | 1);
        // SAFETY: as above.
        let (ok, _) = unsafe { compare_exchange(p, 16, 2u128 << 64 | 1, 7u128 << 64 | 3) };
        assert!(ok);
        assert_eq!(&cell.0[..8], &3u64.to_le_bytes());
        assert_eq!(&cell.0[8..], &7u64.to_le_bytes());
    }

    /// The exit a Debian 6.1 kernel produced here at an exception entry (ASM_CLAC).
    #[test]
    fn test_clac_and_stac_set_ac() {
        let clac = [0x0f, 0x01, 0xca, 0xfc, 0xe8, 0xb7, 0x05, 0x00];
        assert_eq!(mnemonic(&clac), "clac");
        assert_eq!(fixup(&clac), Some(Fixup::SetAc(false)));
        assert_eq!(fixup(&[0x0f, 0x01, 0xcb]), Some(Fixup::SetAc(true)));
    }

    /// The exit a Debian 6.1 kernel produced here at FPU init (`fninit; fwait`).
    #[test]
    fn test_fwait_is_stepped_over() {
        let fwait = [0x9b, 0x65, 0x48, 0xc7, 0x05, 0x4d, 0x14, 0xfe, 0x7e];
        assert_eq!(mnemonic(&fwait), "fwait");
        assert_eq!(fixup(&fwait), Some(Fixup::Skip { len: 1 }));
        assert_eq!(mnemonic(&[0xf3, 0x48, 0x0f, 0xb8, 0xc7]), "popcnt");
        assert_eq!(fixup(&[0xf3, 0x48, 0x0f, 0xb8, 0xc7]), None);
    }

    #[test]
    fn test_mnemonics_for_known_blockers() {
        assert_eq!(
            mnemonic(&[0xf0, 0x48, 0x0f, 0xc7, 0x0e]),
            "cmpxchg8b/cmpxchg16b"
        );
        assert_eq!(mnemonic(&[0x48, 0x0f, 0xae, 0x2f]), "xrstor");
        assert_eq!(mnemonic(&[0x0f, 0x01, 0xd1]), "xsetbv");
        assert_eq!(mnemonic(&[0x90]), "unknown");
        assert_eq!(fixup(&[0x0f, 0xae, 0x2f]), None);
        assert!(matches!(
            fixup(&[0xf0, 0x48, 0x0f, 0xc7, 0x0e]),
            Some(Fixup::CompareExchange(_))
        ));
    }
}

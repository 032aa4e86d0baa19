//! CPU features a KVM host can give guests: `KVM_GET_SUPPORTED_CPUID` (kvm-ioctls),
//! decoded into cpuinfo-style names so preflight can compare them with a guest's model.

/// (leaf, subleaf, register, bit, name). Register: 0 eax, 1 ebx, 2 ecx, 3 edx.
const BITS: &[(u32, u32, u8, u8, &str)] = &[
    (1, 0, 3, 0, "fpu"),
    (1, 0, 3, 1, "vme"),
    (1, 0, 3, 2, "de"),
    (1, 0, 3, 3, "pse"),
    (1, 0, 3, 4, "tsc"),
    (1, 0, 3, 5, "msr"),
    (1, 0, 3, 6, "pae"),
    (1, 0, 3, 7, "mce"),
    (1, 0, 3, 8, "cx8"),
    (1, 0, 3, 9, "apic"),
    (1, 0, 3, 11, "sep"),
    (1, 0, 3, 12, "mtrr"),
    (1, 0, 3, 13, "pge"),
    (1, 0, 3, 14, "mca"),
    (1, 0, 3, 15, "cmov"),
    (1, 0, 3, 16, "pat"),
    (1, 0, 3, 17, "pse36"),
    (1, 0, 3, 19, "clflush"),
    (1, 0, 3, 23, "mmx"),
    (1, 0, 3, 24, "fxsr"),
    (1, 0, 3, 25, "sse"),
    (1, 0, 3, 26, "sse2"),
    (1, 0, 3, 27, "ss"),
    (1, 0, 3, 28, "ht"),
    (1, 0, 2, 0, "pni"),
    (1, 0, 2, 1, "pclmulqdq"),
    (1, 0, 2, 9, "ssse3"),
    (1, 0, 2, 12, "fma"),
    (1, 0, 2, 13, "cx16"),
    (1, 0, 2, 19, "sse4_1"),
    (1, 0, 2, 20, "sse4_2"),
    (1, 0, 2, 21, "x2apic"),
    (1, 0, 2, 22, "movbe"),
    (1, 0, 2, 23, "popcnt"),
    (1, 0, 2, 25, "aes"),
    (1, 0, 2, 26, "xsave"),
    (1, 0, 2, 28, "avx"),
    (1, 0, 2, 29, "f16c"),
    (1, 0, 2, 30, "rdrand"),
    (7, 0, 1, 0, "fsgsbase"),
    (7, 0, 1, 3, "bmi1"),
    (7, 0, 1, 5, "avx2"),
    (7, 0, 1, 7, "smep"),
    (7, 0, 1, 8, "bmi2"),
    (7, 0, 1, 9, "erms"),
    (7, 0, 1, 10, "invpcid"),
    (7, 0, 1, 16, "avx512f"),
    (7, 0, 1, 17, "avx512dq"),
    (7, 0, 1, 18, "rdseed"),
    (7, 0, 1, 19, "adx"),
    (7, 0, 1, 20, "smap"),
    (7, 0, 1, 23, "clflushopt"),
    (7, 0, 1, 24, "clwb"),
    (7, 0, 1, 28, "avx512cd"),
    (7, 0, 1, 29, "sha_ni"),
    (7, 0, 1, 30, "avx512bw"),
    (7, 0, 1, 31, "avx512vl"),
    (7, 0, 2, 1, "avx512vbmi"),
    (7, 0, 2, 2, "umip"),
    (7, 0, 2, 3, "pku"),
    (7, 0, 2, 8, "gfni"),
    (7, 0, 2, 9, "vaes"),
    (7, 0, 2, 10, "vpclmulqdq"),
    (0xd, 1, 0, 0, "xsaveopt"),
    (0xd, 1, 0, 1, "xsavec"),
    (0xd, 1, 0, 2, "xgetbv1"),
    (0xd, 1, 0, 3, "xsaves"),
    (0x8000_0001, 0, 3, 11, "syscall"),
    (0x8000_0001, 0, 3, 20, "nx"),
    (0x8000_0001, 0, 3, 22, "mmxext"),
    (0x8000_0001, 0, 3, 25, "fxsr_opt"),
    (0x8000_0001, 0, 3, 26, "pdpe1gb"),
    (0x8000_0001, 0, 3, 27, "rdtscp"),
    (0x8000_0001, 0, 3, 29, "lm"),
    (0x8000_0001, 0, 2, 0, "lahf_lm"),
    (0x8000_0001, 0, 2, 5, "abm"),
    (0x8000_0001, 0, 2, 6, "sse4a"),
    (0x8000_0001, 0, 2, 8, "3dnowprefetch"),
];

/// One CPUID leaf's registers.
#[derive(Debug, Clone, Copy, Default)]
pub struct Leaf {
    pub function: u32,
    pub index: u32,
    pub regs: [u32; 4],
}

/// Feature names set in `leaves`, plus the vendor string from leaf 0.
pub fn decode(leaves: &[Leaf]) -> (String, Vec<String>) {
    let find = |f: u32, i: u32| {
        leaves
            .iter()
            .find(|l| l.function == f && (l.index == i || (f != 7 && f != 0xd)))
    };
    let mut names = Vec::new();
    for &(f, i, r, b, name) in BITS {
        if let Some(l) = find(f, i) {
            if l.regs[r as usize] & (1 << b) != 0 {
                names.push(name.to_string());
            }
        }
    }
    let vendor = find(0, 0)
        .map(|l| {
            let bytes: Vec<u8> = [l.regs[1], l.regs[3], l.regs[2]]
                .iter()
                .flat_map(|r| r.to_le_bytes())
                .collect();
            String::from_utf8_lossy(&bytes)
                .trim_end_matches('\0')
                .to_string()
        })
        .unwrap_or_default();
    (vendor, names)
}

/// What this host's KVM offers guests; an error where /dev/kvm is missing or refuses.
pub fn kvm_supported() -> Result<(String, Vec<String>), String> {
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| format!("/dev/kvm: {e}"))?;
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID: {e}"))?;
    let leaves: Vec<Leaf> = cpuid
        .as_slice()
        .iter()
        .map(|e| Leaf {
            function: e.function,
            index: e.index,
            regs: [e.eax, e.ebx, e.ecx, e.edx],
        })
        .collect();
    Ok(decode(&leaves))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_known_bits_and_vendor() {
        let leaves = [
            // "GenuineIntel": ebx "Genu", edx "ineI", ecx "ntel".
            Leaf {
                function: 0,
                index: 0,
                regs: [
                    0xd,
                    u32::from_le_bytes(*b"Genu"),
                    u32::from_le_bytes(*b"ntel"),
                    u32::from_le_bytes(*b"ineI"),
                ],
            },
            Leaf {
                function: 1,
                index: 0,
                regs: [0, 0, 1 << 20, (1 << 0) | (1 << 26)],
            },
            Leaf {
                function: 7,
                index: 0,
                regs: [0, 1 << 5, 0, 0],
            },
            Leaf {
                function: 7,
                index: 1,
                regs: [0, 1 << 16, 0, 0],
            }, // subleaf 1: not avx512f
            Leaf {
                function: 0x8000_0001,
                index: 0,
                regs: [0, 0, 0, (1 << 29) | (1 << 20)],
            },
        ];
        let (vendor, names) = decode(&leaves);
        assert_eq!(vendor, "GenuineIntel");
        assert_eq!(names, vec!["fpu", "sse2", "sse4_2", "avx2", "nx", "lm"]);
    }

    #[test]
    fn this_hosts_kvm_if_it_answers() {
        // Where /dev/kvm answers, a 64-bit x86 host's KVM offers at least lm and sse2.
        match kvm_supported() {
            Ok((vendor, names)) => {
                assert!(!vendor.is_empty(), "vendor from leaf 0");
                assert!(
                    names.iter().any(|n| n == "lm") && names.iter().any(|n| n == "sse2"),
                    "{names:?}"
                );
            }
            Err(e) => assert!(
                e.contains("kvm") || e.contains("KVM"),
                "error names KVM: {e}"
            ),
        }
    }
}

//! How the source verifies the guest's RAM before it lets the target commit.

/// The verification a migration runs before the commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VerifyMode {
    /// The default: the source keeps per-page sums of what it sends and, in the pause,
    /// combines them into a fingerprint the target's (kept the same way as it writes)
    /// must equal — O(pages written), not O(RAM). A write the tracker missed is caught
    /// by the audit during pre-copy (re-hashing pages the tracker calls clean) and by the
    /// tracker's start-up self-test, not in the pause.
    #[default]
    Sent,
    /// The source also hashes all of its RAM in the pause: catches a missed write in the
    /// last round too, at a pause that grows with the RAM size.
    Full,
    /// No comparison (the frames' CRCs remain).
    None,
}

impl VerifyMode {
    /// Whether the fingerprints are compared at all.
    pub fn compares(self) -> bool {
        self != VerifyMode::None
    }

    /// The mode's name, as parsed.
    pub fn as_str(self) -> &'static str {
        match self {
            VerifyMode::Sent => "sent",
            VerifyMode::Full => "full",
            VerifyMode::None => "none",
        }
    }
}

impl std::str::FromStr for VerifyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" | "sent" => Ok(VerifyMode::Sent),
            "full" => Ok(VerifyMode::Full),
            "none" => Ok(VerifyMode::None),
            other => Err(format!(
                "verify: unknown mode '{other}' (sent, full or none)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_mode_and_refuses_others() {
        for m in [VerifyMode::Sent, VerifyMode::Full, VerifyMode::None] {
            assert_eq!(m.as_str().parse::<VerifyMode>(), Ok(m));
        }
        assert_eq!("".parse::<VerifyMode>(), Ok(VerifyMode::Sent));
        assert!("partial".parse::<VerifyMode>().is_err());
        assert!(!VerifyMode::None.compares() && VerifyMode::Sent.compares());
    }
}

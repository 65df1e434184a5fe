//! The TPM, and nothing else of measured starts touches it: read and extend one PCR of the
//! SHA-256 bank through tpm2-tss's ESAPI.
//!
//! Why `tss-esapi` (the Parallaxsecond bindings to tpm2-tss, `libtss2-dev` from Debian): it is
//! the maintained Rust interface to the TCG software stack that `tpm2-tools`, systemd and the
//! kernel's resource manager users share, and it speaks every TCTI tpm2-tss has (`device:`,
//! `swtpm:`, `mssim:`, `tabrmd:`) without code of ours. Hand-writing TPM2 command marshalling
//! (even for two commands) would be security code nobody else reviews.
//!
//! A context is opened for each operation and closed after it: `tss_esapi::Context` is not
//! `Send`, the daemon starts containers from many threads, and with `device:/dev/tpmrm0` the
//! kernel's resource manager makes opening cheap (a TCP connect with swtpm). The PCR's auth value
//! is the empty password (a PC-client TPM's PCRs 16 and 23 have no policy), so an extend is one
//! command in a password session.

use std::str::FromStr;

use tss_esapi::handles::PcrHandle;
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{Digest, DigestValues, PcrSelectionListBuilder, PcrSlot};
use tss_esapi::{Context, TctiNameConf};

/// A TPM operation that failed, with the TCTI it went to.
#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    #[error("tcti {tcti:?} is not a tpm2-tss TCTI (device:/dev/tpmrm0, swtpm:host=H,port=P, mssim:..., tabrmd:...)")]
    BadTcti { tcti: String },
    #[error("pcr {0} is not a PCR this daemon extends (8-23)")]
    BadPcr(u8),
    #[error("tpm at {tcti:?}: cannot {action}: {source}")]
    Tpm { tcti: String, action: &'static str, source: tss_esapi::Error },
    #[error("tpm at {tcti:?}: pcr {pcr} of the sha256 bank was not returned (is the bank allocated?)")]
    NoValue { tcti: String, pcr: u8 },
}

/// Checks that `tcti` names a TCTI the way tpm2-tss does (the config's check).
pub fn parse_tcti(tcti: &str) -> Result<TctiNameConf, TpmError> {
    TctiNameConf::from_str(tcti).map_err(|_| TpmError::BadTcti { tcti: tcti.into() })
}

/// One PCR of the SHA-256 bank of the TPM at a TCTI.
#[derive(Debug, Clone)]
pub struct Pcr {
    tcti: String,
    index: u8,
}

impl Pcr {
    pub fn new(tcti: &str, index: u8) -> Result<Pcr, TpmError> {
        parse_tcti(tcti)?;
        handle(index)?;
        Ok(Pcr { tcti: tcti.into(), index })
    }

    pub fn index(&self) -> u8 {
        self.index
    }

    fn context(&self) -> Result<Context, TpmError> {
        let conf = parse_tcti(&self.tcti)?;
        Context::new(conf).map_err(|source| self.error("connect", source))
    }

    fn error(&self, action: &'static str, source: tss_esapi::Error) -> TpmError {
        TpmError::Tpm { tcti: self.tcti.clone(), action, source }
    }

    /// The PCR's value now.
    pub fn read(&self) -> Result<[u8; 32], TpmError> {
        let mut context = self.context()?;
        let slot = PcrSlot::try_from(1u32 << self.index).map_err(|e| self.error("select the pcr", e))?;
        let selection = PcrSelectionListBuilder::new()
            .with_selection(HashingAlgorithm::Sha256, &[slot])
            .build()
            .map_err(|e| self.error("select the pcr", e))?;
        let (_, _, digests) = context.pcr_read(selection).map_err(|e| self.error("read the pcr", e))?;
        let value = digests.value().first().map(|d| d.value().to_vec()).unwrap_or_default();
        value.try_into().map_err(|_| TpmError::NoValue { tcti: self.tcti.clone(), pcr: self.index })
    }

    /// Extends `digest` into the PCR: it becomes sha256(old value || digest).
    pub fn extend(&self, digest: &[u8; 32]) -> Result<(), TpmError> {
        let mut context = self.context()?;
        let mut values = DigestValues::new();
        let digest = Digest::try_from(digest.to_vec()).map_err(|e| self.error("extend the pcr", e))?;
        values.set(HashingAlgorithm::Sha256, digest);
        let pcr = handle(self.index)?;
        context
            .execute_with_session(Some(AuthSession::Password), |context| context.pcr_extend(pcr, values))
            .map_err(|e| self.error("extend the pcr", e))
    }
}

/// What a PCR holds after `digest` is extended into `value`.
pub fn extended(value: &[u8; 32], digest: &[u8; 32]) -> [u8; 32] {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    hasher.update(value);
    hasher.update(digest);
    hasher.finalize().into()
}

fn handle(index: u8) -> Result<PcrHandle, TpmError> {
    const HANDLES: [PcrHandle; 16] = [
        PcrHandle::Pcr8,
        PcrHandle::Pcr9,
        PcrHandle::Pcr10,
        PcrHandle::Pcr11,
        PcrHandle::Pcr12,
        PcrHandle::Pcr13,
        PcrHandle::Pcr14,
        PcrHandle::Pcr15,
        PcrHandle::Pcr16,
        PcrHandle::Pcr17,
        PcrHandle::Pcr18,
        PcrHandle::Pcr19,
        PcrHandle::Pcr20,
        PcrHandle::Pcr21,
        PcrHandle::Pcr22,
        PcrHandle::Pcr23,
    ];
    index.checked_sub(8).and_then(|i| HANDLES.get(usize::from(i)).copied()).ok_or(TpmError::BadPcr(index))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcti_names_are_checked() {
        for good in ["device:/dev/tpmrm0", "swtpm:host=127.0.0.1,port=2321", "mssim:host=localhost,port=2321"] {
            assert!(parse_tcti(good).is_ok(), "{good}");
        }
        for bad in ["", "tpm", "socket:/x"] {
            assert!(parse_tcti(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn extend_is_sha256_of_old_and_new() {
        // tpm2_pcrextend 23:sha256=00..00 on a reset PCR 23 (all zeros) gives this value.
        let zero = [0u8; 32];
        assert_eq!(
            hex::encode(extended(&zero, &zero)),
            "f5a5fd42d16a20302798ef6ed309979b43003d2320d9f0e8ea9831a92759fb4b"
        );
        assert!(handle(7).is_err() && handle(24).is_err());
        assert_eq!(handle(23).unwrap(), PcrHandle::Pcr23);
    }
}

//! The sealing key of an SEV-SNP guest: `SNP_GET_DERIVED_KEY` on `/dev/sev-guest`
//! (linux/sev-guest.h; SEV-SNP firmware ABI, MSG_KEY_REQ / MSG_KEY_RSP).
//!
//! The AMD Secure Processor derives the key from the VCEK root (or, where the cloud
//! provider installed one, the VLEK, shared by that provider's chips) and the fields
//! selected below, so only a guest launched with the same measurement and policy gets the
//! same key: the host, another guest, or a guest whose measured launch differs cannot
//! unseal what this one sealed. The measurement covers the aggregator's code only when
//! the guest boots it measured (direct boot with kernel, initrd and command-line hashes,
//! and a verity-protected root filesystem); with a plain firmware boot it covers the
//! firmware alone. The firmware's key is then run through HKDF with Tessera's own label.
//! The request and response layouts are checked by tests against the kernel header; the
//! ioctl itself only runs inside an SNP guest.

use std::path::Path;

use zeroize::Zeroizing;

use crate::sealing::{SealError, SealingKey};

pub const DEFAULT_DEVICE: &str = "/dev/sev-guest";

/// GUEST_FIELD_SELECT bits (SNP firmware ABI, MSG_KEY_REQ).
pub const FIELD_GUEST_POLICY: u64 = 1 << 0;
pub const FIELD_IMAGE_ID: u64 = 1 << 1;
pub const FIELD_FAMILY_ID: u64 = 1 << 2;
pub const FIELD_MEASUREMENT: u64 = 1 << 3;
pub const FIELD_GUEST_SVN: u64 = 1 << 4;
pub const FIELD_TCB_VERSION: u64 = 1 << 5;

/// What Tessera mixes into its sealing key: the launch measurement (the aggregator's
/// code, under a measured boot) and the guest policy (so a debug launch of the same image gets
/// another key). Not the TCB version, so a firmware update does not strand sealed state.
pub const TESSERA_FIELDS: u64 = FIELD_GUEST_POLICY | FIELD_MEASUREMENT;

/// `struct snp_derived_key_req`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct DerivedKeyRequest {
    /// Bit 0: 0 derives from the VCEK/VLEK, 1 from the VM root key. Bits 2:1 (KEY_SEL,
    /// newer firmware): 0 picks the VLEK if one is installed, else the VCEK; Tessera
    /// leaves them 0, which every SNP firmware accepts.
    pub root_key_select: u32,
    pub rsvd: u32,
    pub guest_field_select: u64,
    /// The VMPL to mix in; must be at least the guest's own.
    pub vmpl: u32,
    pub guest_svn: u32,
    pub tcb_version: u64,
}

/// `struct snp_guest_request_ioctl`.
#[derive(Debug, Default)]
#[repr(C)]
pub struct GuestRequestIoctl {
    pub msg_version: u8,
    pub req_data: u64,
    pub resp_data: u64,
    /// bits 0..32: firmware error; bits 32..64: VMM error.
    pub exitinfo2: u64,
}

/// `_IOWR('S', 0x1, struct snp_guest_request_ioctl)`.
pub const SNP_GET_DERIVED_KEY: u64 = ioc_readwrite(b'S', 0x1, std::mem::size_of::<GuestRequestIoctl>());

const fn ioc_readwrite(ty: u8, nr: u8, size: usize) -> u64 {
    // asm-generic/ioctl.h: dir (read|write = 3) << 30 | size << 16 | type << 8 | nr.
    (3u64 << 30) | ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64
}

/// The firmware's answer: MSG_KEY_RSP is STATUS (u32), 28 reserved bytes, the 32-byte key.
pub fn key_from_response(resp: &[u8; 64]) -> Result<Zeroizing<[u8; 32]>, SealError> {
    let status = u32::from_le_bytes([resp[0], resp[1], resp[2], resp[3]]);
    if status != 0 {
        return Err(SealError::Hardware(format!("the firmware refused the key request (MSG_KEY_RSP status {status:#x})")));
    }
    let mut key = Zeroizing::new([0u8; 32]);
    key.copy_from_slice(&resp[32..64]);
    if key.iter().all(|&b| b == 0) {
        return Err(SealError::Hardware("the firmware returned an all-zero derived key".into()));
    }
    Ok(key)
}

/// Who answers a key request: the kernel driver, or a test double.
pub trait KeyRequester {
    fn request(&self, req: &DerivedKeyRequest) -> Result<Zeroizing<[u8; 64]>, SealError>;
}

/// HKDF-SHA256 info: the firmware's key is used for nothing but this derivation.
pub const SEALING_KEY_INFO: &[u8] = b"tessera sealing key v1";

/// Asks the AMD Secure Processor through `requester` for the key bound to
/// [`TESSERA_FIELDS`] at VMPL `vmpl` (from the VCEK, or the VLEK where installed), and
/// derives Tessera's sealing key from it.
pub fn derive_sealing_key(requester: &dyn KeyRequester, vmpl: u32) -> Result<SealingKey, SealError> {
    let req = DerivedKeyRequest { root_key_select: 0, guest_field_select: TESSERA_FIELDS, vmpl, ..Default::default() };
    let resp = requester.request(&req)?;
    let firmware_key = key_from_response(&resp)?;
    let mut key = Zeroizing::new([0u8; 32]);
    hkdf::Hkdf::<sha2::Sha256>::new(None, firmware_key.as_slice())
        .expand(SEALING_KEY_INFO, key.as_mut_slice())
        .map_err(|_| SealError::Hardware("HKDF cannot expand 32 bytes".into()))?;
    Ok(SealingKey::from_zeroizing(key))
}

/// `/dev/sev-guest`.
#[derive(Debug)]
pub struct SevGuestDevice {
    file: std::fs::File,
}

impl SevGuestDevice {
    pub fn open(path: &Path) -> Result<Self, SealError> {
        let file =
            std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(|e| {
                SealError::Hardware(format!("cannot open {} ({e}); is this an SEV-SNP guest with the sev-guest driver loaded?", path.display()))
            })?;
        Ok(SevGuestDevice { file })
    }
}

impl KeyRequester for SevGuestDevice {
    #[allow(unsafe_code)]
    fn request(&self, req: &DerivedKeyRequest) -> Result<Zeroizing<[u8; 64]>, SealError> {
        use std::os::fd::AsRawFd;
        let mut resp = Zeroizing::new([0u8; 64]);
        let mut io = GuestRequestIoctl { msg_version: 1, req_data: req as *const DerivedKeyRequest as u64, resp_data: resp.as_mut_ptr() as u64, exitinfo2: 0 };
        // SAFETY: `io` is a valid `snp_guest_request_ioctl` whose `req_data` points at a
        // live `snp_derived_key_req` (32 bytes, repr(C)) and `resp_data` at a writable
        // 64-byte `snp_derived_key_resp`; all three outlive the call, and the kernel
        // writes only `io.exitinfo2` and the 64 response bytes.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), SNP_GET_DERIVED_KEY as libc::c_ulong, &mut io as *mut GuestRequestIoctl) };
        if rc != 0 {
            let os = std::io::Error::last_os_error();
            let (fw, vmm) = (io.exitinfo2 & 0xffff_ffff, io.exitinfo2 >> 32);
            return Err(SealError::Hardware(format!("SNP_GET_DERIVED_KEY failed: {os} (firmware error {fw:#x}, VMM error {vmm:#x})")));
        }
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::mem::{offset_of, size_of};

    use super::*;

    #[test]
    fn layouts_match_the_kernel_header() {
        // linux/sev-guest.h: struct snp_derived_key_req is u32, u32, u64, u32, u32, u64.
        assert_eq!(size_of::<DerivedKeyRequest>(), 32);
        assert_eq!(offset_of!(DerivedKeyRequest, guest_field_select), 8);
        assert_eq!(offset_of!(DerivedKeyRequest, vmpl), 16);
        assert_eq!(offset_of!(DerivedKeyRequest, guest_svn), 20);
        assert_eq!(offset_of!(DerivedKeyRequest, tcb_version), 24);
        // struct snp_guest_request_ioctl: u8 (padded), u64, u64, union of u64.
        assert_eq!(size_of::<GuestRequestIoctl>(), 32);
        assert_eq!(offset_of!(GuestRequestIoctl, req_data), 8);
        assert_eq!(offset_of!(GuestRequestIoctl, resp_data), 16);
        assert_eq!(offset_of!(GuestRequestIoctl, exitinfo2), 24);
        // The value a C program including the header prints for SNP_GET_DERIVED_KEY.
        assert_eq!(SNP_GET_DERIVED_KEY, 0xC020_5301);
    }

    struct Fake {
        seen: RefCell<Option<DerivedKeyRequest>>,
        resp: [u8; 64],
    }

    impl KeyRequester for Fake {
        fn request(&self, req: &DerivedKeyRequest) -> Result<Zeroizing<[u8; 64]>, SealError> {
            *self.seen.borrow_mut() = Some(*req);
            Ok(Zeroizing::new(self.resp))
        }
    }

    fn response(status: u32, key: [u8; 32]) -> [u8; 64] {
        let mut r = [0u8; 64];
        r[..4].copy_from_slice(&status.to_le_bytes());
        r[32..].copy_from_slice(&key);
        r
    }

    #[test]
    fn the_key_is_bound_to_measurement_and_policy_from_the_vcek_root() {
        let fake = Fake { seen: RefCell::new(None), resp: response(0, [7; 32]) };
        let key = derive_sealing_key(&fake, 0).unwrap();
        assert!(!key.is_insecure());
        let req = fake.seen.borrow().unwrap();
        assert_eq!(req.root_key_select, 0, "the VCEK (or VLEK) root, KEY_SEL left to the firmware's default");
        assert_eq!(req.guest_field_select, FIELD_MEASUREMENT | FIELD_GUEST_POLICY);
        assert_eq!(req.guest_field_select & FIELD_TCB_VERSION, 0);
        // The same firmware key gives the same sealing key; the firmware key itself is not
        // the sealing key (HKDF with Tessera's label separates it from other uses).
        let sealed = key.seal(b"t", b"secret");
        let again = derive_sealing_key(&Fake { seen: RefCell::new(None), resp: response(0, [7; 32]) }, 0).unwrap();
        assert_eq!(&*again.unseal(b"t", &sealed).unwrap(), b"secret");
        assert!(SealingKey::from_bytes([7; 32]).unseal(b"t", &sealed).is_err());
        let other = derive_sealing_key(&Fake { seen: RefCell::new(None), resp: response(0, [8; 32]) }, 0).unwrap();
        assert!(other.unseal(b"t", &sealed).is_err());
    }

    #[test]
    fn firmware_errors_and_empty_keys_are_refused() {
        for resp in [response(0x16, [7; 32]), response(0, [0; 32])] {
            let fake = Fake { seen: RefCell::new(None), resp };
            assert!(matches!(derive_sealing_key(&fake, 0), Err(SealError::Hardware(_))));
        }
    }

    #[test]
    fn a_missing_device_names_itself() {
        let err = SevGuestDevice::open(Path::new("/nonexistent/sev-guest")).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/sev-guest") && err.contains("SEV-SNP guest"), "{err}");
    }
}

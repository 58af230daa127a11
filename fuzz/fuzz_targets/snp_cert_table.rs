//! The SEV-SNP extended-report certificate table (configfs-tsm `auxblob`): GUID, offset,
//! length entries ending in an all-zero one, with offsets into the table itself.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(certs) = tessera_attestation::tsm::parse_snp_cert_table(data) {
        // Every certificate is a slice of the table.
        assert!(certs.iter().all(|c| c.len() <= data.len()));
    }
});

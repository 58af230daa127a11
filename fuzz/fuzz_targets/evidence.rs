//! Every evidence parser and verifier (SEV-SNP incl. Azure HCL, TDX/SGX DCAP, Nitro,
//! dev, bundles) through format detection; the first byte picks how the rest is split
//! into evidence and one endorsement.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let cut = (split as usize * rest.len()) / 256;
    let (evidence, endorsement) = rest.split_at(cut);
    let _ = tessera_attestation::inspect(evidence);
    let _ = tessera_attestation::verify(evidence, &[], 1_700_000_000);
    let _ = tessera_attestation::verify(evidence, &[endorsement.to_vec()], 1_700_000_000);
});

//! The auditor's inputs: a round bundle (report, log entries, proofs, tree head,
//! evidence), a single log entry and a signed tree head, parsed and, when they parse,
//! audited or derived into a report. Nothing may panic, whatever the host serves.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tessera_attestation::audit::{audit_bundle, derive_report, AuditInputs, LogEntry, RoundBundle};
use tessera_attestation::policy::NodePolicy;
use tessera_attestation::translog::SignedTreeHead;

fuzz_target!(|data: &[u8]| {
    if let Ok(bundle) = serde_json::from_slice::<RoundBundle>(data) {
        let inputs = AuditInputs { policy: NodePolicy::insecure_dev(), now_secs: 1_700_000_000, previous_head: Some(bundle.tree_head.clone()), mean: Some(data.to_vec()) };
        let _ = audit_bundle(&bundle, &inputs);
    }
    if let Ok(entry) = LogEntry::parse(data) {
        let _ = derive_report(&[entry.clone(), entry]);
    }
    if let Ok(head) = serde_json::from_slice::<SignedTreeHead>(data) {
        let _ = head.verify(&[7; 32]);
    }
});

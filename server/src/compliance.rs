//! What compliance staff and auditors read: the round list, a round's report (the
//! exportable [`RoundBundle`] that `tessera-attest audit` verifies offline), the
//! transparency log with its proofs, and the denial log.

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use tessera_attestation::audit::{derive_report, AggregatorEvidence, BundleEntry, ConsistencyProof, LogEntry, RoundBundle, BUNDLE_VERSION};
use tessera_attestation::translog::SignedTreeHead;

use crate::auth::{Principal, Role};
use crate::error::ApiError;
use crate::service::{now, Service};

/// The most entries one `GET /v1/log/entries` returns.
pub const MAX_ENTRIES: u64 = 1000;

/// Filters of `GET /v1/rounds`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundFilter {
    /// `open`, `finished` or `aborted`.
    pub status: Option<String>,
    /// Opened at or after this time (RFC 3339, or ms since the Unix epoch).
    pub since: Option<String>,
    /// Opened before this time.
    pub until: Option<String>,
    /// Institution name on the round's roster.
    pub participant: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RoundSummary {
    pub round: u64,
    pub status: String,
    pub outcome: Option<String>,
    pub opened_at_ms: u64,
    pub participants: Vec<String>,
    pub dp: bool,
    pub report: String,
    pub page: String,
}

fn parse_time(what: &str, v: &str) -> Result<u64, ApiError> {
    if let Ok(ms) = v.parse::<u64>() {
        return Ok(ms);
    }
    chrono::DateTime::parse_from_rfc3339(v)
        .ok()
        .and_then(|t| u64::try_from(t.timestamp_millis()).ok())
        .ok_or_else(|| ApiError::bad_request("bad_query", format!("{what}={v:?} is neither RFC 3339 nor milliseconds since the epoch")))
}

impl Service {
    /// Rounds, newest first, filtered; an institution sees only its own rounds.
    pub async fn list_rounds(&self, filter: &RoundFilter, who: &Principal) -> Result<Vec<RoundSummary>, ApiError> {
        if let Some(s) = &filter.status {
            if !["open", "finished", "aborted"].contains(&s.as_str()) {
                return Err(ApiError::bad_request("bad_query", format!("status={s:?}: expected open, finished or aborted")));
            }
        }
        let since = filter.since.as_deref().map(|v| parse_time("since", v)).transpose()?;
        let until = filter.until.as_deref().map(|v| parse_time("until", v)).transpose()?;
        let participant_key = match &filter.participant {
            Some(name) => Some(
                self.config()
                    .institutions
                    .iter()
                    .find(|i| &i.name == name)
                    .map(|i| i.public_key.to_ascii_lowercase())
                    .ok_or_else(|| ApiError::bad_request("bad_query", format!("participant={name:?} is not a configured institution")))?,
            ),
            None => None,
        };
        let mut out = Vec::new();
        for row in self.store().rounds().await?.into_iter().rev() {
            let on_roster = |k: &str| row.config.roster.iter().any(|r| r.eq_ignore_ascii_case(k));
            if who.role == Role::Institution && !who.institution_key.as_deref().is_some_and(on_roster) {
                continue;
            }
            if filter.status.as_ref().is_some_and(|s| s != &row.status)
                || since.is_some_and(|t| row.opened_at.0 < t)
                || until.is_some_and(|t| row.opened_at.0 >= t)
                || participant_key.as_deref().is_some_and(|k| !on_roster(k))
            {
                continue;
            }
            out.push(RoundSummary {
                round: row.round,
                status: row.status.clone(),
                outcome: row.outcome.clone(),
                opened_at_ms: row.opened_at.0,
                participants: row.config.roster.iter().map(|k| self.institution_name(k).unwrap_or("(unknown)").to_string()).collect(),
                dp: row.config.dp.is_some(),
                report: format!("/v1/rounds/{}/report", row.round),
                page: format!("/reports/{}", row.round),
            });
        }
        Ok(out)
    }

    /// The roster of a round, or 404.
    pub async fn roster(&self, round: u64) -> Result<Vec<String>, ApiError> {
        Ok(self.store().round(round).await?.ok_or_else(|| unknown_round(round))?.config.roster)
    }

    /// A round's report with everything needed to verify it offline: the log entries,
    /// their inclusion proofs to a freshly signed tree head, the aggregator's evidence,
    /// and (with `since_size`) a consistency proof from an earlier head.
    pub async fn bundle(&self, round: u64, since_size: Option<u64>) -> Result<RoundBundle, ApiError> {
        // The head first: every entry below its size is stored (entries are stored under
        // the same lock, before it is released), so the round's entries up to it are all
        // there, and a running round's record reaches the head.
        let head = self.log_head().await;
        let stored: Vec<_> = self.store().log_of_round(round).await?.into_iter().filter(|e| e.index < head.tree_size).collect();
        if stored.is_empty() {
            return Err(match self.store().round(round).await? {
                Some(_) => ApiError::new(StatusCode::CONFLICT, "no_log_record", format!("round {round} predates the transparency log: it has no report")),
                None => unknown_round(round),
            });
        }
        let report = report_of(&stored)?;
        let (proofs, consistency) = self
            .with_enclave(|enclave| -> Result<_, ApiError> {
                let log = enclave.log();
                let proofs = stored.iter().map(|e| log.inclusion(e.index, head.tree_size)).collect::<Result<Vec<_>, _>>().map_err(ApiError::internal)?;
                let consistency = match since_size {
                    None => None,
                    Some(old) if old > head.tree_size => {
                        return Err(ApiError::bad_request("bad_query", format!("since_size={old} is larger than the log ({})", head.tree_size)))
                    }
                    Some(old) => Some(ConsistencyProof {
                        from_size: old,
                        proof: log.consistency(old, head.tree_size).map_err(ApiError::internal)?.iter().map(hex::encode).collect(),
                    }),
                };
                Ok((proofs, consistency))
            })
            .await?;
        let att = self.attestation();
        // The evidence the round was opened under (an earlier start's, after a restart).
        let (evidence, tls_fingerprint) = match self.store().evidence(&report.aggregator_evidence_sha256).await? {
            Some((bytes, fp)) => (hex::encode(bytes), fp),
            None => (att.evidence, att.tls_fingerprint),
        };
        // What the evidence says it measured, as of the round (the auditor re-verifies it).
        let measurement = hex::decode(&evidence)
            .ok()
            .and_then(|bytes| tessera_attestation::verify(&bytes, &[], report.opened_at_ms / 1000).ok())
            .map(|claims| claims.measurement);
        let names = report.participants.iter().filter_map(|p| self.institution_name(&p.identity).map(|n| (p.identity.clone(), n.to_string()))).collect();
        Ok(RoundBundle {
            version: BUNDLE_VERSION,
            round,
            report,
            names,
            aggregator: AggregatorEvidence { format: att.format, identity_public_key: att.identity_public_key, tls_fingerprint, evidence, measurement },
            tree_head: head,
            entries: stored
                .into_iter()
                .zip(proofs)
                .map(|(e, p)| BundleEntry {
                    index: e.index,
                    data: String::from_utf8_lossy(&e.data).into_owned(),
                    inclusion_proof: p.iter().map(hex::encode).collect(),
                })
                .collect(),
            consistency,
        })
    }

    pub async fn log_head(&self) -> SignedTreeHead {
        self.with_enclave(|e| e.tree_head(now().0)).await
    }

    pub async fn log_entries(&self, start: u64, end: Option<u64>) -> Result<Vec<LogEntryView>, ApiError> {
        let size = self.with_enclave(|e| e.log().size()).await;
        let end = end.unwrap_or(size).min(size).min(start.saturating_add(MAX_ENTRIES));
        if start > end {
            return Err(ApiError::bad_request("bad_query", format!("start={start} is past the end of the log ({size})")));
        }
        Ok(self
            .store()
            .log_range(start, end)
            .await?
            .into_iter()
            .map(|e| LogEntryView {
                index: e.index,
                round: e.round,
                leaf_hash: hex::encode(tessera_attestation::translog::leaf_hash(&e.data)),
                data: String::from_utf8_lossy(&e.data).into_owned(),
            })
            .collect())
    }

    pub async fn inclusion_proof(&self, index: u64, tree_size: Option<u64>) -> Result<InclusionView, ApiError> {
        self.with_enclave(|e| {
            let size = tree_size.unwrap_or(e.log().size());
            let proof = e.log().inclusion(index, size).map_err(|err| ApiError::bad_request("bad_query", err.to_string()))?;
            Ok(InclusionView { index, tree_size: size, proof: proof.iter().map(hex::encode).collect() })
        })
        .await
    }

    pub async fn consistency_proof(&self, first: u64, second: Option<u64>) -> Result<ConsistencyView, ApiError> {
        self.with_enclave(|e| {
            let second = second.unwrap_or(e.log().size());
            if first > second {
                return Err(ApiError::bad_request("bad_query", format!("first={first} is larger than second={second}")));
            }
            let proof = e.log().consistency(first, second).map_err(|err| ApiError::bad_request("bad_query", err.to_string()))?;
            Ok(ConsistencyView { first, second, proof: proof.iter().map(hex::encode).collect() })
        })
        .await
    }
}

/// The report of a round's stored log entries (the round's whole record, in order).
pub(crate) fn report_of(stored: &[tessera_enclave::log::StoredLogEntry]) -> Result<tessera_attestation::audit::RoundReport, ApiError> {
    let entries: Vec<LogEntry> = stored.iter().map(|e| LogEntry::parse(&e.data)).collect::<Result<_, _>>().map_err(ApiError::internal)?;
    derive_report(&entries).map_err(ApiError::internal)
}

fn unknown_round(round: u64) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "unknown_round", format!("round {round} does not exist"))
}

#[derive(Clone, Debug, Serialize)]
pub struct LogEntryView {
    pub index: u64,
    pub round: u64,
    pub leaf_hash: String,
    /// The entry's JSON, exactly as hashed.
    pub data: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct InclusionView {
    pub index: u64,
    pub tree_size: u64,
    pub proof: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ConsistencyView {
    pub first: u64,
    pub second: u64,
    pub proof: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_times() {
        assert_eq!(parse_time("since", "0").unwrap(), 0);
        assert_eq!(parse_time("since", "1970-01-01T00:00:01Z").unwrap(), 1000);
        assert_eq!(parse_time("since", "1970-01-01T01:00:01.5+01:00").unwrap(), 1500);
        for bad in ["yesterday", "1969-12-31T23:59:59Z", "-5", ""] {
            assert_eq!(parse_time("since", bad).unwrap_err().status, StatusCode::BAD_REQUEST, "{bad}");
        }
    }
}

//! Report pages for compliance officers: plain HTML with a print stylesheet, no
//! JavaScript. Every value shown comes from the same [`RoundBundle`] the JSON API
//! serves, and every value is HTML-escaped.

use std::fmt::Write;

use tessera_attestation::audit::{RecordPrivacySource, RoundBundle};

use crate::compliance::RoundSummary;

/// Escapes text for HTML element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = r#"
body { font-family: "DejaVu Sans", Helvetica, Arial, sans-serif; margin: 2rem auto; max-width: 64rem; color: #1b1f24; padding: 0 1rem; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { font-size: 1.15rem; margin-top: 2rem; border-bottom: 1px solid #ccd; padding-bottom: .2rem; }
table { border-collapse: collapse; width: 100%; font-size: .9rem; } th, td { text-align: left; padding: .3rem .5rem; border-bottom: 1px solid #e3e6ea; vertical-align: top; }
th { background: #f3f5f7; } code, .hash { font-family: "DejaVu Sans Mono", monospace; font-size: .8rem; word-break: break-all; }
.ok { color: #116329; font-weight: bold; } .bad { color: #a40e26; font-weight: bold; } .warn { background: #fff4d6; border: 1px solid #e5b000; padding: .5rem .8rem; }
.muted { color: #59636e; } nav a { margin-right: 1rem; }
@media print { nav, form { display: none; } body { margin: 0; max-width: none; } a { color: inherit; text-decoration: none; } }
"#;

fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{STYLE}</style></head>\n<body>\n<nav><a href=\"/reports\">Rounds</a><a href=\"/login\">Sign in</a></nav>\n{body}</body></html>\n",
        esc(title)
    )
}

fn time(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64).map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string()).unwrap_or_else(|| format!("{ms} ms"))
}

fn eps(v: Option<f64>) -> String {
    v.map(|e| format!("{e:.3}")).unwrap_or_else(|| "—".into())
}

pub fn error_page(status: axum::http::StatusCode, code: &str, message: &str) -> String {
    page(&format!("Tessera — {status}"), &format!("<h1>{}</h1><p id=\"error\"><code>{}</code>: {}</p>", esc(&status.to_string()), esc(code), esc(message)))
}

/// The sign-in form: it stores the token in an HttpOnly cookie for these pages.
pub fn login(error: Option<&str>) -> String {
    let err = error.map(|e| format!("<p class=\"bad\" id=\"error\">{}</p>", esc(e))).unwrap_or_default();
    page(
        "Tessera — sign in",
        &format!(
            "<h1>Sign in</h1>{err}<form method=\"post\" action=\"/login\"><label for=\"token\">Access token</label> \
             <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"off\" size=\"40\"> \
             <button id=\"signin\" type=\"submit\">Sign in</button></form>\
             <p class=\"muted\">Auditors, administrators and institutions receive their token from the operator.</p>"
        ),
    )
}

pub fn round_list(rounds: &[RoundSummary], who: &str) -> String {
    let mut rows = String::new();
    for r in rounds {
        let _ = write!(
            rows,
            "<tr><td><a href=\"{}\">Round {}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&r.page),
            r.round,
            esc(&r.status),
            esc(r.outcome.as_deref().unwrap_or("")),
            time(r.opened_at_ms),
            esc(&r.participants.join(", ")),
            if r.dp { "yes" } else { "no" }
        );
    }
    if rounds.is_empty() {
        rows.push_str("<tr><td colspan=\"6\" class=\"muted\">No rounds.</td></tr>");
    }
    page(
        "Tessera — rounds",
        &format!(
            "<h1>Rounds</h1><p class=\"muted\">Signed in as {}.</p><table id=\"rounds\"><thead><tr><th>Round</th><th>Status</th><th>Outcome</th>\
             <th>Opened</th><th>Participants</th><th>DP</th></tr></thead><tbody>{rows}</tbody></table>",
            esc(who)
        ),
    )
}

/// One round's compliance report.
pub fn report(b: &RoundBundle) -> String {
    let r = &b.report;
    let mut h = String::new();
    let name = |id: &str| b.names.get(id).cloned().unwrap_or_else(|| format!("{}…", &id[..id.len().min(16)]));
    let _ = write!(h, "<h1>Round {} — compliance report</h1>", r.round);
    let status_class = if r.status == "released" {
        "ok"
    } else if r.status == "aborted" {
        "bad"
    } else {
        "muted"
    };
    let _ = write!(
        h,
        "<p>Status: <span id=\"status\" class=\"{status_class}\">{}</span>{}. Opened {}{}.</p>",
        esc(&r.status),
        r.abort_reason.as_ref().map(|a| format!(" — {}", esc(a))).unwrap_or_default(),
        time(r.opened_at_ms),
        r.closed_at_ms.map(|t| format!(", closed {}", time(t))).unwrap_or_default()
    );
    if r.aggregator_format.starts_with("dev-insecure") {
        h.push_str(
            "<p class=\"warn\" id=\"insecure\">INSECURE DEV MODE: the aggregator's evidence is simulated and proves nothing about the code it runs.</p>",
        );
    }

    h.push_str("<h2>Aggregator</h2><table>");
    let _ = write!(
        h,
        "<tr><th>Evidence format</th><td id=\"aggregator-format\">{}</td></tr>\
         <tr><th>Measurement</th><td class=\"hash\" id=\"aggregator-measurement\">{}</td></tr>\
         <tr><th>Evidence SHA-256</th><td class=\"hash\">{}</td></tr>\
         <tr><th>Identity key (signs tree heads and releases)</th><td class=\"hash\">{}</td></tr>\
         <tr><th>TLS key SHA-256</th><td class=\"hash\">{}</td></tr>\
         <tr><th>Node policy SHA-256</th><td class=\"hash\">{}</td></tr>\
         <tr><th>Round configuration digest</th><td class=\"hash\">{}</td></tr>\
         <tr><th>Threshold t / neighbours k / vector length</th><td>{} / {} / {}</td></tr></table>",
        esc(&r.aggregator_format),
        esc(b.aggregator.measurement.as_deref().unwrap_or("not readable without endorsements")),
        esc(&r.aggregator_evidence_sha256),
        esc(&b.aggregator.identity_public_key),
        esc(&b.aggregator.tls_fingerprint),
        esc(&r.node_policy_sha256),
        esc(&r.config_digest),
        r.min_survivors,
        r.neighbours,
        r.vector_len
    );

    h.push_str(
        "<h2>Participants</h2><table id=\"participants\"><thead><tr><th>Institution</th><th>Admission</th><th>Evidence</th>\
         <th>Masked input SHA-256</th><th>In the sum</th><th>Dropped in</th><th>Cumulative ε</th><th>Record-level ε</th></tr></thead><tbody>",
    );
    for p in &r.participants {
        let admission = match &p.admission {
            Some(a) if a.accepted => "<span class=\"ok\">admitted</span>".to_string(),
            Some(a) => format!("<span class=\"bad\">rejected</span>: {}", esc(&a.failures.join("; "))),
            None => "<span class=\"muted\">did not advertise</span>".into(),
        };
        let evidence = p
            .admission
            .as_ref()
            .map(|a| {
                format!(
                    "{}<br><span class=\"hash\">{}</span>{}",
                    esc(a.format.as_deref().unwrap_or("unverified")),
                    esc(a.measurement.as_deref().unwrap_or("")),
                    if a.debug == Some(true) { " <span class=\"bad\">DEBUG</span>" } else { "" }
                )
            })
            .unwrap_or_default();
        let record = match &p.record_privacy {
            Some(rp) => format!(
                "<span class=\"record-epsilon\">{:.3}</span> of {} (δ = {:e})<br><span class=\"muted\">σ = {:.3}, q = {:.4}, C = {}, {} steps</span><br><span class=\"{}\" title=\"{}\">{}</span>",
                rp.claim.epsilon,
                rp.claim.budget,
                rp.claim.delta,
                rp.claim.noise_multiplier,
                rp.claim.sample_rate,
                rp.claim.max_grad_norm,
                rp.claim.steps,
                if rp.source == RecordPrivacySource::Measured { "ok" } else { "bad" },
                esc(rp.source.explained()),
                if rp.source == RecordPrivacySource::Measured { "measured code" } else { "institution's claim (dev mode)" }
            ),
            None if p.masked_input_sha256.is_some() => "<span class=\"muted\">none stated</span>".into(),
            None => "—".into(),
        };
        let _ = write!(
            h,
            "<tr><td>{}<br><span class=\"hash muted\">{}</span></td><td>{admission}</td><td>{evidence}</td><td class=\"hash\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{record}</td></tr>",
            esc(&name(&p.identity)),
            esc(&p.identity),
            esc(p.masked_input_sha256.as_deref().unwrap_or("—")),
            if p.included { "yes" } else { "no" },
            esc(p.dropped_in.as_deref().unwrap_or("—")),
            eps(p.epsilon_cumulative)
        );
    }
    h.push_str("</tbody></table>");
    if r.participants.iter().any(|p| p.record_privacy.is_some()) {
        h.push_str(
            "<p class=\"muted\" id=\"record-legend\">Cumulative ε is the institution-level guarantee of the noise on the sum (zero-out adjacency: \
             one institution's update). Record-level ε is each institution's DP-SGD guarantee for any one of its records over every local run \
             so far, signed with its masked input: <em>measured code</em> when it was admitted on hardware evidence that met the node policy, \
             otherwise only the <em>institution's claim</em>.</p>",
        );
    }

    h.push_str("<h2>Protocol phases</h2><table id=\"phases\"><thead><tr><th>Phase</th><th>Closed</th><th>Answered</th><th>Missing</th></tr></thead><tbody>");
    for ph in &r.phases {
        let names = |v: &[u32]| {
            v.iter().map(|c| r.participants.get(*c as usize).map(|p| name(&p.identity)).unwrap_or_else(|| c.to_string())).collect::<Vec<_>>().join(", ")
        };
        let _ = write!(
            h,
            "<tr><td>{} → {}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&ph.from),
            esc(&ph.to),
            time(ph.at_ms),
            esc(&names(&ph.responded)),
            esc(&names(&ph.missing))
        );
    }
    h.push_str("</tbody></table>");

    h.push_str("<h2>Differential privacy</h2>");
    match &r.dp {
        Some(dp) => {
            let coalition = match dp.colluders {
                0 => "a participant (calibrated to outsiders only: insiders see less noise)".to_string(),
                1 => "any one participant, who subtracts its own noise share".to_string(),
                f => format!("any {f} colluding participants, who subtract their own noise shares"),
            };
            let noise = match dp.skellam {
                None => "Gaussian shares, added in floating point and rounded into the modulus with the update".to_string(),
                Some(s) => format!(
                    "Skellam shares drawn in the integers after quantization (scale {:e}, conditional rounding β = {:.3}, {} coordinates): the released sum is exactly the accounted mechanism",
                    s.scale, s.beta, s.dim
                ),
            };
            let _ = write!(
                h,
                "<p id=\"adjacency\">Adjacency: {}. The aggregator and its host know no noise share; the figures against participants are the ones the budget is charged.</p>\
                 <table id=\"privacy\"><tr><th>Noise</th><td id=\"noise\">{}</td></tr><tr><th>Noise multiplier z (against {})</th><td>{}</td></tr><tr><th>L2 clip C</th><td>{}</td></tr><tr><th>δ</th><td>{:e}</td></tr>\
                 <tr><th>ε budget</th><td>{}</td></tr>\
                 <tr><th>ε of this round, against {}</th><td id=\"epsilon-round\">{}</td></tr>\
                 <tr><th>ε spent by the federation, cumulative, against {}</th><td id=\"epsilon\">{}</td></tr>\
                 <tr><th>ε of this round, against outsiders</th><td id=\"epsilon-outsider-round\">{}</td></tr>\
                 <tr><th>ε spent by the federation, cumulative, against outsiders</th><td id=\"epsilon-outsider\">{}</td></tr></table>",
                esc(dp.adjacency.explained()),
                esc(&noise),
                esc(&coalition),
                dp.noise_multiplier,
                dp.l2_clip,
                dp.delta,
                dp.epsilon_budget,
                esc(&coalition),
                eps(r.epsilon_round),
                esc(&coalition),
                eps(r.epsilon_cumulative),
                eps(r.epsilon_outsider_round),
                eps(r.epsilon_outsider_cumulative)
            );
        }
        None => h.push_str("<p id=\"privacy\">This round ran without differential privacy.</p>"),
    }

    h.push_str("<h2>Release</h2>");
    match &r.release {
        Some(rel) => {
            let _ = write!(
                h,
                "<table id=\"release\"><tr><th>Mean SHA-256</th><td class=\"hash\" id=\"mean-sha256\">{}</td></tr><tr><th>Institutions in the sum</th><td>{}</td></tr>\
                 <tr><th>Total weight</th><td>{}</td></tr><tr><th>Quantization error bound</th><td>{:e}</td></tr><tr><th>Release signature</th><td class=\"hash\">{}</td></tr></table>",
                esc(&rel.mean_sha256),
                rel.included.len(),
                rel.total_weight,
                rel.error_bound,
                esc(&rel.release_signature)
            );
        }
        None => h.push_str("<p>Nothing was released.</p>"),
    }

    let _ = write!(
        h,
        "<h2>Transparency log</h2><p>Signed tree head: size <span id=\"tree-size\">{}</span>, root <span class=\"hash\">{}</span>, signed {}.</p>\
         <p>This round's {} entries (indices {}–{}) each come with an inclusion proof in the JSON report. To verify everything offline:</p>\
         <pre><code>curl -H 'Authorization: Bearer …' https://HOST/v1/rounds/{}/report &gt; round-{}.json\ntessera-attest audit round-{}.json</code></pre>",
        b.tree_head.tree_size,
        esc(&b.tree_head.root_hash),
        time(b.tree_head.timestamp_ms),
        r.entries.len(),
        r.entries.first().copied().unwrap_or(0),
        r.entries.last().copied().unwrap_or(0),
        r.round,
        r.round,
        r.round
    );
    h.push_str("<table id=\"entries\"><thead><tr><th>#</th><th>Event</th></tr></thead><tbody>");
    for e in &b.entries {
        let kind = serde_json::from_str::<serde_json::Value>(&e.data).ok().and_then(|v| v["event"]["type"].as_str().map(str::to_string)).unwrap_or_default();
        let _ = write!(h, "<tr><td>{}</td><td>{}</td></tr>", e.index, esc(&kind));
    }
    h.push_str("</tbody></table>");
    page(&format!("Tessera — round {} report", r.round), &h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(esc("<script>alert('x')</script> & \"q\""), "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;");
        let html = login(Some("<b>bad</b>"));
        assert!(html.contains("&lt;b&gt;bad&lt;/b&gt;") && !html.contains("<b>bad</b>"));
    }
}

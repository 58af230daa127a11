//! Request latency histograms (hdrhistogram) per route, exported in the Prometheus text
//! format at `/metrics`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use hdrhistogram::Histogram;

#[derive(Debug, Default)]
pub struct Metrics {
    routes: Mutex<BTreeMap<(String, String), RouteStats>>,
    /// TLS handshakes completed since the start: with kept-alive connections, about
    /// one per institution, not one per request.
    pub tls_handshakes: std::sync::atomic::AtomicU64,
    /// `/v1/privacy`'s PRV floors of record-level claims: served from the cache, and
    /// computed (see `service::FloorCache`).
    pub privacy_floor_hits: std::sync::atomic::AtomicU64,
    pub privacy_floor_misses: std::sync::atomic::AtomicU64,
}

#[derive(Debug)]
struct RouteStats {
    latency_us: Histogram<u64>,
    errors: u64,
}

impl Metrics {
    pub fn record(&self, method: &str, route: &str, micros: u64, error: bool) {
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        let stats = routes.entry((method.to_string(), route.to_string())).or_insert_with(|| RouteStats {
            // 1 µs to 1 h at 3 significant digits; creation cannot fail for these bounds.
            latency_us: Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap_or_else(|_| unreachable!("valid bounds")),
            errors: 0,
        });
        let _ = stats.latency_us.record(micros.max(1));
        stats.errors += error as u64;
    }

    pub fn render(&self) -> String {
        let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = format!(
            "# HELP tessera_tls_handshakes_total TLS handshakes completed.\n# TYPE tessera_tls_handshakes_total counter\ntessera_tls_handshakes_total {}\n",
            self.tls_handshakes.load(std::sync::atomic::Ordering::Relaxed)
        );
        out.push_str(&format!(
            "# HELP tessera_privacy_floor_cache_total PRV floors of record-level claims for /v1/privacy, by whether the cache had them.\n# TYPE tessera_privacy_floor_cache_total counter\ntessera_privacy_floor_cache_total{{result=\"hit\"}} {}\ntessera_privacy_floor_cache_total{{result=\"miss\"}} {}\n",
            self.privacy_floor_hits.load(std::sync::atomic::Ordering::Relaxed),
            self.privacy_floor_misses.load(std::sync::atomic::Ordering::Relaxed)
        ));
        out.push_str("# HELP tessera_http_request_duration_seconds Request latency by route.\n# TYPE tessera_http_request_duration_seconds summary\n");
        for ((method, route), s) in routes.iter() {
            let labels = format!("method=\"{method}\",route=\"{route}\"");
            for q in [0.5, 0.9, 0.99, 0.999] {
                let v = s.latency_us.value_at_quantile(q) as f64 / 1e6;
                out.push_str(&format!("tessera_http_request_duration_seconds{{{labels},quantile=\"{q}\"}} {v}\n"));
            }
            out.push_str(&format!("tessera_http_request_duration_seconds_count{{{labels}}} {}\n", s.latency_us.len()));
            out.push_str(&format!("tessera_http_request_errors_total{{{labels}}} {}\n", s.errors));
        }
        out
    }
}

pub async fn track(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    let start = Instant::now();
    let resp = next.run(req).await;
    let error = resp.status().is_client_error() || resp.status().is_server_error();
    metrics.record(&method, &route, start.elapsed().as_micros() as u64, error);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_quantiles_per_route() {
        let m = Metrics::default();
        for us in 1..=1000 {
            m.record("GET", "/v1/health", us, us % 100 == 0);
        }
        let text = m.render();
        assert!(text.contains("route=\"/v1/health\",quantile=\"0.5\"} 0.0005"), "{text}");
        assert!(text.contains("tessera_http_request_errors_total{method=\"GET\",route=\"/v1/health\"} 10"));
    }
}

//! The API's endpoints: a request in, a response out, through the [`Control`] trait so the
//! routing and every refusal can be tested without a VM.

use serde_json::{json, Value};

use super::http::{Request, Response, PROMETHEUS};
use super::prometheus;
use crate::metrics::Report;

/// Largest `poll_us` accepted (the same bound as `--disk …,poll-us=`).
pub const POLL_US_MAX: u64 = 1_000_000;

/// The two kinds of device whose poll window can be changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Disk,
    Net,
}

impl DeviceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Disk => "disk",
            DeviceKind::Net => "net",
        }
    }
}

/// Why the control plane could not do what a well-formed request asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("No VM is running (between bench jobs, or stopping)")]
    NoVm,
    #[error("No {} with id `{id}`", kind.as_str())]
    UnknownDevice { kind: DeviceKind, id: String },
    #[error("The reactors did not answer: {0}")]
    Reactor(String),
    #[error("Cannot write the interval log: {0}")]
    Hlog(String),
}

impl ControlError {
    fn status(&self) -> u16 {
        match self {
            ControlError::NoVm | ControlError::Reactor(_) => 503,
            ControlError::UnknownDevice { .. } => 404,
            ControlError::Hlog(_) => 500,
        }
    }
}

/// What the endpoints act on: the running VM.
pub trait Control {
    /// Configuration, state, uptime and placement of the VM (`GET /vm`).
    fn vm(&self) -> Result<Value, ControlError>;
    /// Renders the statistics as of now (at most [`super::SNAPSHOT_REUSE`] old) with `f`,
    /// which also gets the VM's uptime in seconds. The report is borrowed, not copied.
    fn render(&self, f: &mut dyn FnMut(&Report, f64) -> String) -> Result<String, ControlError>;
    /// Closes the current statistics interval and starts the next (`PUT /stats/interval`).
    fn interval(&self) -> Result<Value, ControlError>;
    /// Sets the poll-window maximum of a device's queues (`PATCH /disks/{id}`, `/nets/{id}`).
    fn set_poll_us(&self, kind: DeviceKind, id: &str, poll_us: u32) -> Result<Value, ControlError>;
    /// Starts the orderly stop (`PUT /vm/stop`).
    fn stop(&self) -> Result<(), ControlError>;
}

fn reply(r: Result<Value, ControlError>, ok: u16) -> Response {
    match r {
        Ok(v) => Response::json(ok, &v),
        Err(e) => Response::error(e.status(), &e.to_string()),
    }
}

fn method_not_allowed(req: &Request, allow: &'static str) -> Response {
    let mut r = Response::error(
        405,
        &format!(
            "Method {} not allowed on {} (use {allow})",
            req.method, req.path
        ),
    );
    r.allow = Some(allow);
    r
}

/// The `poll_us` of a PATCH body: a JSON object with exactly that one field, an integer
/// from 0 to [`POLL_US_MAX`].
fn parse_poll_us(body: &[u8]) -> Result<u32, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("Malformed JSON body: {e}"))?;
    let obj = v
        .as_object()
        .ok_or("The body must be a JSON object such as {\"poll_us\": 32}")?;
    if let Some(k) = obj.keys().find(|k| *k != "poll_us") {
        return Err(format!("Unknown field `{k}` (the only one is poll_us)"));
    }
    let p = obj.get("poll_us").ok_or("Missing field poll_us")?;
    match p.as_u64() {
        Some(n) if n <= POLL_US_MAX => Ok(n as u32),
        _ => Err(format!(
            "poll_us must be an integer from 0 to {POLL_US_MAX} (µs), not {p}"
        )),
    }
}

/// Answers one request.
pub fn route(req: &Request, ctl: &dyn Control) -> Response {
    let m = req.method.as_str();
    match req.path.as_str() {
        "/vm" => match m {
            "GET" => reply(ctl.vm(), 200),
            _ => method_not_allowed(req, "GET"),
        },
        "/stats" => match m {
            "GET" => match ctl.render(&mut |r, _| r.to_json() + "\n") {
                Ok(t) => Response::text(200, super::http::JSON, t),
                Err(e) => Response::error(e.status(), &e.to_string()),
            },
            _ => method_not_allowed(req, "GET"),
        },
        "/metrics" => match m {
            "GET" => match ctl.render(&mut prometheus::exposition) {
                Ok(t) => Response::text(200, PROMETHEUS, t),
                Err(e) => Response::error(e.status(), &e.to_string()),
            },
            _ => method_not_allowed(req, "GET"),
        },
        "/stats/interval" => match m {
            "PUT" => reply(ctl.interval(), 200),
            _ => method_not_allowed(req, "PUT"),
        },
        "/vm/stop" => match m {
            "PUT" => reply(ctl.stop().map(|()| json!({ "stopping": true })), 202),
            _ => method_not_allowed(req, "PUT"),
        },
        path => {
            let (kind, id) = if let Some(id) = path.strip_prefix("/disks/") {
                (DeviceKind::Disk, id)
            } else if let Some(id) = path.strip_prefix("/nets/") {
                (DeviceKind::Net, id)
            } else {
                return Response::error(404, &format!("No endpoint {path}"));
            };
            if id.is_empty() || id.contains('/') {
                return Response::error(404, &format!("No endpoint {path}"));
            }
            if m != "PATCH" {
                return method_not_allowed(req, "PATCH");
            }
            match parse_poll_us(&req.body) {
                Ok(us) => reply(ctl.set_poll_us(kind, id, us), 200),
                Err(msg) => Response::error(400, &msg),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    #[derive(Default)]
    struct Fake {
        calls: RefCell<Vec<String>>,
        no_vm: bool,
    }

    impl Control for Fake {
        fn vm(&self) -> Result<Value, ControlError> {
            if self.no_vm {
                return Err(ControlError::NoVm);
            }
            Ok(json!({"state": "running"}))
        }
        fn render(
            &self,
            f: &mut dyn FnMut(&Report, f64) -> String,
        ) -> Result<String, ControlError> {
            Ok(f(&Report::default(), 1.5))
        }
        fn interval(&self) -> Result<Value, ControlError> {
            Ok(json!({"interval": 1}))
        }
        fn set_poll_us(&self, kind: DeviceKind, id: &str, us: u32) -> Result<Value, ControlError> {
            if id != "blk0" {
                return Err(ControlError::UnknownDevice {
                    kind,
                    id: id.into(),
                });
            }
            self.calls
                .borrow_mut()
                .push(format!("{} {id} {us}", kind.as_str()));
            Ok(json!({"poll_us": us}))
        }
        fn stop(&self) -> Result<(), ControlError> {
            self.calls.borrow_mut().push("stop".into());
            Ok(())
        }
    }

    fn req(method: &str, path: &str, body: &str) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            body: body.as_bytes().to_vec(),
            close: false,
        }
    }

    fn call(ctl: &Fake, method: &str, path: &str, body: &str) -> (u16, Value) {
        let r = route(&req(method, path, body), ctl);
        let v = if r.content_type == PROMETHEUS {
            Value::Null
        } else {
            serde_json::from_slice(&r.body).unwrap()
        };
        (r.status, v)
    }

    #[test]
    fn test_route_known_endpoints_answer() {
        let f = Fake::default();
        assert_eq!(call(&f, "GET", "/vm", "").0, 200);
        assert_eq!(call(&f, "GET", "/stats", "").1["queues"], json!([]));
        assert_eq!(call(&f, "GET", "/metrics", "").0, 200);
        assert_eq!(call(&f, "PUT", "/stats/interval", "").1["interval"], 1);
        assert_eq!(call(&f, "PATCH", "/disks/blk0", "{\"poll_us\": 7}").0, 200);
        assert_eq!(call(&f, "PUT", "/vm/stop", "").0, 202);
        assert_eq!(*f.calls.borrow(), vec!["disk blk0 7", "stop"]);
    }

    #[test]
    fn test_route_unknown_path_is_404_with_json_error() {
        let f = Fake::default();
        for p in ["/", "/nope", "/disks/", "/disks/a/b", "/vm/"] {
            let (s, v) = call(&f, "GET", p, "");
            assert_eq!(s, 404, "{p}");
            assert!(v["error"].as_str().unwrap().contains("No endpoint"), "{v}");
        }
        let (s, v) = call(&f, "PATCH", "/nets/net9", "{\"poll_us\": 1}");
        assert_eq!(
            (s, v["error"].as_str().unwrap()),
            (404, "No net with id `net9`")
        );
    }

    #[test]
    fn test_route_wrong_method_is_405_with_allow() {
        let f = Fake::default();
        for (m, p, allow) in [
            ("POST", "/vm", "GET"),
            ("DELETE", "/metrics", "GET"),
            ("GET", "/stats/interval", "PUT"),
            ("GET", "/vm/stop", "PUT"),
            ("PUT", "/disks/blk0", "PATCH"),
        ] {
            let r = route(&req(m, p, ""), &f);
            assert_eq!((r.status, r.allow), (405, Some(allow)), "{m} {p}");
        }
        assert!(f.calls.borrow().is_empty(), "nothing ran");
    }

    #[test]
    fn test_route_bad_patch_bodies_are_400_naming_the_problem() {
        let f = Fake::default();
        for (body, says) in [
            ("{poll_us: 5", "Malformed JSON"),
            ("", "Malformed JSON"),
            ("[1]", "must be a JSON object"),
            ("{}", "Missing field poll_us"),
            ("{\"poll_us\": -1}", "integer from 0 to 1000000"),
            ("{\"poll_us\": 1.5}", "integer from 0 to 1000000"),
            ("{\"poll_us\": \"5\"}", "integer from 0 to 1000000"),
            ("{\"poll_us\": 1000001}", "integer from 0 to 1000000"),
            ("{\"poll_us\": 5, \"x\": 1}", "Unknown field `x`"),
        ] {
            let (s, v) = call(&f, "PATCH", "/disks/blk0", body);
            assert_eq!(s, 400, "{body}");
            assert!(v["error"].as_str().unwrap().contains(says), "{body}: {v}");
        }
        assert!(f.calls.borrow().is_empty(), "nothing changed");
    }

    #[test]
    fn test_route_without_vm_is_503() {
        let f = Fake {
            no_vm: true,
            ..Default::default()
        };
        assert_eq!(call(&f, "GET", "/vm", "").0, 503);
    }
}

//! How S3 failures map to Sluice's errors: determinate (the request
//! certainly had no effect) or indeterminate (it may have), with a one-line
//! hint for people over the SDK's error, which stays in the source chain.

use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use sluice_core::{BoxError, Error};

/// Whether a failed request may have changed the store. Reads (GET, HEAD,
/// List) never do; writes (PUT, CompleteMultipartUpload, DeleteObject(s))
/// may, unless the failure proves they were not processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Request {
    /// GET, HEAD, List: a failure is always determinate.
    Read,
    /// PUT, CompleteMultipartUpload, DeleteObject(s): a failure is
    /// determinate only if the request certainly had no effect.
    Write,
}

/// A failed S3 request: a one-line hint for people (bucket, endpoint, S3
/// error code, HTTP status, what to check; never credentials) over the
/// SDK's error, which stays reachable as the [`source`](std::error::Error::source).
#[derive(Debug)]
struct S3Failure {
    message: String,
    source: BoxError,
}

impl std::fmt::Display for S3Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for S3Failure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.source.as_ref())
    }
}

/// Where the failed request went, for the messages.
pub(crate) struct Target<'a> {
    pub bucket: &'a str,
    pub endpoint: &'a str,
}

/// The hint for an endpoint that cannot be reached.
const CHECK_ENDPOINT: &str =
    "check the endpoint (--s3-endpoint or AWS_ENDPOINT_URL) and that the server is up";

/// How an S3 error maps to Sluice's, in the caller's terms.
///
/// Determinate (`Storage`, `NotFound`, `AlreadyExists`, `Corrupt`): every
/// failure of a read; for a write, only what certainly had no effect — a
/// request the store answered with a 3xx or 4xx (rejected credentials,
/// validation, precondition: not processed), one that could not be built
/// (never sent), or one without usable credentials (never signed, never
/// sent). `Indeterminate`: a write that timed out, failed in dispatch (the
/// request may have been sent), got a 5xx (incl. 503 SlowDown after the
/// retries) or an unreadable response.
///
/// The source of `Storage` / `Indeterminate` is an [`S3Failure`] whose
/// source is the `SdkError`. Never includes credentials: only the bucket,
/// the endpoint, the object and S3's error code.
pub(crate) fn classify<E>(
    target: &Target<'_>,
    request: Request,
    what: &str,
    e: SdkError<E, HttpResponse>,
) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let Target { bucket, endpoint } = *target;
    tracing::debug!(
        "S3 {what} in s3://{bucket} at {endpoint} failed: {}",
        DisplayErrorContext(&e)
    );
    let at = format!("{what} in s3://{bucket} at {endpoint}");
    let effect = "the request may or may not have taken effect: read back before deciding";
    let storage = |message: String, e: SdkError<E, HttpResponse>| Error::Storage {
        what: at.clone(),
        source: Box::new(S3Failure {
            message,
            source: Box::new(e),
        }),
    };
    let maybe = |message: String, e: SdkError<E, HttpResponse>| match request {
        Request::Read => storage(message, e),
        Request::Write => Error::Indeterminate {
            what: at.clone(),
            source: Box::new(S3Failure {
                message: format!("{message}; {effect}"),
                source: Box::new(e),
            }),
        },
    };
    if let SdkError::ServiceError(se) = &e {
        let status = se.raw().status().as_u16();
        let code = se.err().code().unwrap_or("").to_string();
        let s3_message = se.err().message().unwrap_or("").to_string();
        let label = if code.is_empty() {
            format!("HTTP {status}")
        } else {
            format!("{code}, HTTP {status}")
        };
        return match (code.as_str(), status) {
            ("NoSuchBucket", _) => Error::NotFound {
                what: format!("bucket {bucket} at {endpoint} (create it, or check the bucket name)"),
            },
            ("NoSuchKey", _) | ("NotFound", _) | (_, 404) => {
                Error::not_found(format!("{what} in s3://{bucket}"))
            }
            ("PreconditionFailed", _) | (_, 412) => Error::AlreadyExists {
                what: format!("{what} in s3://{bucket}"),
            },
            ("InvalidRange", _) | (_, 416) => {
                Error::corrupt(what, "the object is shorter than the range read (truncated?)")
            }
            ("InvalidAccessKeyId", _)
            | ("SignatureDoesNotMatch", _)
            | ("AccessDenied", _)
            | (_, 401)
            | (_, 403) => storage(
                format!(
                    "the endpoint rejected the credentials ({label}): check AWS_ACCESS_KEY_ID / \
                         AWS_SECRET_ACCESS_KEY or AWS_PROFILE, and the bucket's permissions"
                ),
                e,
            ),
            // Rejected before processing (3xx redirects, 4xx incl. 429): no effect.
            (_, 300..=499) => storage(
                if status == 429 || code == "SlowDown" || code == "Throttling" {
                    format!("throttled by S3 ({label}) after retries")
                } else {
                    format!("S3 refused the request ({label}): {s3_message}")
                },
                e,
            ),
            ("SlowDown", _) | (_, 503) => maybe(format!("throttled by S3 ({label}) after retries"), e),
            // 5xx, or an error inside a 200 (CompleteMultipartUpload).
            _ => maybe(format!("S3 failed ({label}): {s3_message}"), e),
        };
    }
    match &e {
        SdkError::ConstructionFailure(_) => {
            let cause = root_cause(&e).unwrap_or_default();
            storage(format!("the request could not be built, so it was not sent: {cause}"), e)
        }
        SdkError::DispatchFailure(_) if credentials_failed(&e) => storage(
            format!(
                "no usable AWS credentials for s3://{bucket}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, \
                 or AWS_PROFILE (a profile in ~/.aws/config), or run with an instance or container role"
            ),
            e,
        ),
        SdkError::TimeoutError(_) => maybe(format!("timed out; {CHECK_ENDPOINT}"), e),
        SdkError::DispatchFailure(_) => {
            let message = match root_cause(&e) {
                Some(cause) => format!("cannot reach the endpoint: {cause}; {CHECK_ENDPOINT}"),
                None => format!("cannot reach the endpoint; {CHECK_ENDPOINT}"),
            };
            maybe(message, e)
        }
        SdkError::ResponseError(_) => maybe(format!("the response of {endpoint} could not be read"), e),
        _ => maybe("the request failed".into(), e),
    }
}

/// Whether the request failed because no credentials could be resolved (it
/// was then never signed nor sent).
fn credentials_failed(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        if err.is::<CredentialsError>() {
            return true;
        }
        next = err.source();
    }
    false
}

/// The innermost cause of `e` (e.g. "Connection refused (os error 111)"),
/// if it is short enough for a one-line message.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let (mut last, mut depth) = (e, 0);
    while let Some(next) = last.source() {
        (last, depth) = (next, depth + 1);
    }
    let text = last.to_string();
    (depth > 0 && !text.is_empty() && !text.contains('\n') && text.len() <= 120).then_some(text)
}

/// A determinate failure. Used where a failed write changes nothing anyone
/// reads: the probe at open, the creation and the parts of a multipart
/// upload (only its completion makes the object exist), and aborts of
/// unfinished uploads.
pub(crate) fn determinate(e: Error) -> Error {
    match e {
        Error::Indeterminate { what, source } => Error::Storage { what, source },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_s3::error::{ConnectorError, ErrorMetadata};
    use aws_sdk_s3::operation::put_object::PutObjectError;
    use aws_sdk_s3::primitives::SdkBody;
    use std::error::Error as _;

    type PutError = SdkError<PutObjectError, HttpResponse>;
    /// Makes one failure of a test case.
    type Make = fn() -> PutError;

    const TARGET: Target<'static> = Target {
        bucket: "jobs",
        endpoint: "http://127.0.0.1:3900",
    };

    fn service(status: u16, code: &str) -> PutError {
        let err = PutObjectError::generic(ErrorMetadata::builder().code(code).message("said S3").build());
        let raw = HttpResponse::new(status.try_into().expect("a valid status"), SdkBody::empty());
        SdkError::service_error(err, raw)
    }

    fn refused() -> PutError {
        let io = std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection refused (os error 111)",
        );
        SdkError::dispatch_failure(ConnectorError::io(Box::new(io)))
    }

    fn timed_out() -> PutError {
        SdkError::timeout_error("operation timeout (all attempts including retries) occurred after 4s")
    }

    fn no_credentials() -> PutError {
        let cause = CredentialsError::not_loaded("no credentials found in chain");
        SdkError::dispatch_failure(ConnectorError::other(Box::new(cause), None))
    }

    fn unreadable() -> PutError {
        let raw = HttpResponse::new(200.try_into().expect("a valid status"), SdkBody::empty());
        SdkError::response_error("the body is not XML", raw)
    }

    fn never_built() -> PutError {
        SdkError::construction_failure("the key is missing")
    }

    fn kind(e: &Error) -> &'static str {
        match e {
            Error::Storage { .. } => "storage",
            Error::Indeterminate { .. } => "indeterminate",
            Error::AlreadyExists { .. } => "already exists",
            Error::NotFound { .. } => "not found",
            Error::Corrupt { .. } => "corrupt",
            _ => "other",
        }
    }

    /// Whether the error's source chain reaches an `SdkError`.
    fn chain_reaches_the_sdk_error(e: &Error) -> bool {
        let mut next = e.source();
        while let Some(err) = next {
            if err.is::<PutError>() {
                return true;
            }
            next = err.source();
        }
        false
    }

    #[test]
    fn write_failures_are_determinate_only_when_the_request_certainly_had_no_effect() {
        let cases: Vec<(&str, Make, &str)> = vec![
            (
                "HTTP 403 AccessDenied",
                || service(403, "AccessDenied"),
                "storage",
            ),
            (
                "HTTP 403 SignatureDoesNotMatch",
                || service(403, "SignatureDoesNotMatch"),
                "storage",
            ),
            (
                "HTTP 403 InvalidAccessKeyId",
                || service(403, "InvalidAccessKeyId"),
                "storage",
            ),
            ("HTTP 401", || service(401, ""), "storage"),
            (
                "HTTP 400 InvalidArgument",
                || service(400, "InvalidArgument"),
                "storage",
            ),
            (
                "HTTP 409 conflict",
                || service(409, "ConditionalRequestConflict"),
                "storage",
            ),
            ("HTTP 429", || service(429, "TooManyRequests"), "storage"),
            (
                "HTTP 301 redirect",
                || service(301, "PermanentRedirect"),
                "storage",
            ),
            (
                "HTTP 412",
                || service(412, "PreconditionFailed"),
                "already exists",
            ),
            ("HTTP 404", || service(404, "NoSuchKey"), "not found"),
            ("NoSuchBucket", || service(404, "NoSuchBucket"), "not found"),
            ("never built", never_built, "storage"),
            ("no credentials", no_credentials, "storage"),
            ("HTTP 500", || service(500, "InternalError"), "indeterminate"),
            ("HTTP 503 SlowDown", || service(503, "SlowDown"), "indeterminate"),
            (
                "an error in a 200",
                || service(200, "InternalError"),
                "indeterminate",
            ),
            ("timeout", timed_out, "indeterminate"),
            ("connection refused", refused, "indeterminate"),
            ("unreadable response", unreadable, "indeterminate"),
        ];
        for (name, make, expected) in cases {
            let e = classify(&TARGET, Request::Write, "chk-1/_metadata", make());
            assert_eq!(kind(&e), expected, "{name}: {e}");
        }
    }

    #[test]
    fn read_failures_are_always_determinate() {
        let cases: Vec<(&str, Make)> = vec![
            ("HTTP 500", || service(500, "InternalError")),
            ("HTTP 503 SlowDown", || service(503, "SlowDown")),
            ("timeout", timed_out),
            ("connection refused", refused),
            ("unreadable response", unreadable),
            ("HTTP 403", || service(403, "AccessDenied")),
        ];
        for (name, make) in cases {
            let e = classify(&TARGET, Request::Read, "chk-1/_metadata", make());
            assert_eq!(kind(&e), "storage", "{name}: {e}");
        }
        assert_eq!(
            kind(&classify(
                &TARGET,
                Request::Read,
                "x",
                service(416, "InvalidRange")
            )),
            "corrupt"
        );
    }

    #[test]
    fn storage_and_indeterminate_errors_keep_the_sdk_error_in_their_source_chain() {
        let makers: [Make; 6] = [
            || service(500, "InternalError"),
            || service(403, "AccessDenied"),
            timed_out,
            refused,
            no_credentials,
            unreadable,
        ];
        for request in [Request::Read, Request::Write] {
            for make in makers {
                let e = classify(&TARGET, request, "chk-1/_metadata", make());
                assert!(
                    matches!(e, Error::Storage { .. } | Error::Indeterminate { .. }),
                    "{e}"
                );
                assert!(
                    chain_reaches_the_sdk_error(&e),
                    "{request:?} {e}: the source chain lost the SdkError"
                );
            }
        }
    }

    #[test]
    fn messages_are_one_line_and_name_the_bucket_the_endpoint_and_what_to_check() {
        let e = classify(&TARGET, Request::Write, "chk-1/_metadata", refused());
        let text = e.to_string();
        assert!(!text.contains('\n'), "{text}");
        for needle in [
            "s3://jobs",
            "http://127.0.0.1:3900",
            "Connection refused",
            "--s3-endpoint",
            "AWS_ENDPOINT_URL",
            "may or may not have taken effect",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from: {text}");
        }
        let text = classify(&TARGET, Request::Read, "bucket check", no_credentials()).to_string();
        assert!(!text.contains('\n'), "{text}");
        for needle in [
            "no usable AWS credentials",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_PROFILE",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from: {text}");
        }
        assert!(
            !text.contains("no credentials found in chain"),
            "the chain belongs in the source: {text}"
        );
        let text = classify(
            &TARGET,
            Request::Write,
            "chk-1/_metadata",
            service(403, "AccessDenied"),
        )
        .to_string();
        assert!(
            text.contains("AccessDenied") && text.contains("HTTP 403") && text.contains("AWS_ACCESS_KEY_ID"),
            "{text}"
        );
        let text = classify(
            &TARGET,
            Request::Write,
            "chk-1/_metadata",
            service(503, "SlowDown"),
        )
        .to_string();
        assert!(text.contains("SlowDown") && text.contains("HTTP 503"), "{text}");
    }
}

//! Redaction: secrets never reach a log line, a metric, a printed error or a stored job reason.
//!
//! Why one module: secrets arrive by several roads — a password in `DATABASE_URL` (as
//! `user:pass@` or `?password=`), a provider that echoes the API key in its error body, a
//! `Bearer` header quoted back — and each road ends in the same few sinks (tracing, stderr,
//! `apalis.jobs.last_result`). Everything bound for those sinks from outside passes through
//! [`secrets`]; URLs pass through [`url`].

const MASK: &str = "[REDACTED]";

/// `postgres://user:secret@host/db?password=x` → `postgres://user:***@host/db?password=***`.
pub fn url(url: &str) -> String {
    let out = match url.split_once("://") {
        Some((scheme, rest)) => {
            // The userinfo ends at the last '@' before the path.
            let authority_end = rest.find('/').unwrap_or(rest.len());
            match rest[..authority_end].rfind('@') {
                Some(at) => match rest[..at].split_once(':') {
                    Some((user, _)) => format!("{scheme}://{user}:***{}", &rest[at..]),
                    None => url.to_string(),
                },
                None => url.to_string(),
            }
        }
        None => url.to_string(),
    };
    mask_values(&out, "***")
}

/// `text` with `key` (the configured API key, when given), anything that looks like an API key
/// (`sk-…`), bearer tokens, and URL or `password=` passwords masked.
pub fn secrets(text: &str, key: Option<&str>) -> String {
    let mut out = text.to_string();
    if let Some(k) = key.filter(|k| k.len() >= 8) {
        out = out.replace(k, MASK);
    }
    out = mask_prefixed(&out, "sk-", 16);
    out = mask_after(&out, "Bearer ");
    out = mask_after(&out, "bearer ");
    out = mask_values(&out, MASK);
    mask_url_passwords(&out)
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// Masks every `prefix` followed by at least `min` token characters (a whole word).
fn mask_prefixed(text: &str, prefix: &str, min: usize) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(prefix) {
        let starts_word = rest[..i]
            .chars()
            .next_back()
            .is_none_or(|c| !is_token_char(c));
        let tail = &rest[i + prefix.len()..];
        let len = tail.find(|c: char| !is_token_char(c)).unwrap_or(tail.len());
        out.push_str(&rest[..i]);
        if starts_word && len >= min {
            out.push_str(MASK);
        } else {
            out.push_str(&rest[i..i + prefix.len() + len]);
        }
        rest = &tail[len..];
    }
    out.push_str(rest);
    out
}

/// Masks the token following each `marker` (e.g. `Bearer `).
fn mask_after(text: &str, marker: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(marker) {
        let tail = &rest[i + marker.len()..];
        let len = tail
            .find(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == ',')
            .unwrap_or(tail.len());
        out.push_str(&rest[..i + marker.len()]);
        out.push_str(if len > 0 { MASK } else { "" });
        rest = &tail[len..];
    }
    out.push_str(rest);
    out
}

/// Parameter names whose values are secrets, compared lower-cased and percent-decoded
/// (`?PASSWORD=` and `?pass%77ord=` are the same parameter to libpq and to us).
const SECRET_PARAMS: [&str; 2] = ["password", "sslpassword"];

/// Replaces the value of each `name=value` whose name is a [`SECRET_PARAMS`] (up to `&`,
/// whitespace or a quote) with `mask`.
fn mask_values(text: &str, mask: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for (eq, _) in text.match_indices('=') {
        if eq < last {
            continue;
        }
        let start = text[..eq]
            .rfind(|c: char| matches!(c, '?' | '&' | ';' | '"' | '\'' | '(') || c.is_whitespace())
            .map_or(0, |p| p + 1);
        if !SECRET_PARAMS.contains(&percent_decoded_lower(&text[start..eq]).as_str()) {
            continue;
        }
        let tail = &text[eq + 1..];
        let len = tail
            .find(|c: char| c == '&' || c.is_whitespace() || c == '"' || c == '\'')
            .unwrap_or(tail.len());
        out.push_str(&text[last..eq + 1]);
        out.push_str(mask);
        last = eq + 1 + len;
    }
    out.push_str(&text[last..]);
    out
}

/// `s` with `%XX` decoded, lower-cased.
fn percent_decoded_lower(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).to_lowercase()
}

/// An error as one line for stderr or a log: its chain joined with ": ", each message once
/// (sqlx and our context often repeat the database's words), secrets masked.
pub fn error(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for part in e.chain().map(database_error) {
        if part.is_empty() || line.contains(&part) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&part);
    }
    secrets(&line, None)
}

/// The PostgreSQL error in one link of an error chain: sqlx's `Error::Database`, its boxed
/// source, or the error itself.
pub fn pg_error<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a sqlx::postgres::PgDatabaseError> {
    use sqlx::error::DatabaseError;
    if let Some(pg) = e.downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        return Some(pg);
    }
    if let Some(boxed) = e.downcast_ref::<Box<dyn DatabaseError>>() {
        return boxed.try_downcast_ref();
    }
    match e.downcast_ref::<sqlx::Error>() {
        Some(sqlx::Error::Database(d)) => d.try_downcast_ref(),
        _ => None,
    }
}

/// One link of an error chain in words. A PostgreSQL error prints its message with its detail
/// and hint, not sqlx's ` at line 1477` (the line of PostgreSQL's own C source that raised it,
/// which reads as a line of the user's SQL).
fn database_error(e: &(dyn std::error::Error + 'static)) -> String {
    let Some(pg) = pg_error(e) else {
        return e.to_string();
    };
    let mut out = format!("database error: {}", pg.message());
    if let Some(detail) = pg.detail() {
        out.push_str(&format!(" (detail: {detail})"));
    }
    if let Some(hint) = pg.hint() {
        out.push_str(&format!(" (hint: {hint})"));
    }
    out
}

/// `scheme://user:pass@host` anywhere in `text` → `scheme://user:***@host`.
fn mask_url_passwords(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        out.push_str(&rest[..i + 3]);
        let tail = &rest[i + 3..];
        let end = tail
            .find(|c: char| c == '/' || c.is_whitespace() || c == '"' || c == '\'' || c == ')')
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority
            .rfind('@')
            .and_then(|at| authority[..at].split_once(':').map(|(u, _)| (u, at)))
        {
            Some((user, at)) => {
                out.push_str(user);
                out.push_str(":***");
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_string_passwords_are_masked_whatever_their_case_or_encoding() {
        for u in [
            "postgres://u@h/db?PASSWORD=hunter2",
            "postgres://u@h/db?pass%77ord=hunter2&x=1",
            "postgres://u@h/db?x=1&SslPass%57ord=hunter2",
        ] {
            assert!(!url(u).contains("hunter2"), "{u}: {}", url(u));
            assert!(!secrets(u, None).contains("hunter2"), "{u}");
        }
        assert_eq!(
            url("postgres://u@h/db?passwords=1"),
            "postgres://u@h/db?passwords=1"
        );
    }

    #[test]
    fn an_errors_chain_says_each_message_once() {
        let e = anyhow::anyhow!("password authentication failed for user \"x\"")
            .context("password authentication failed for user \"x\"")
            .context("cannot connect");
        assert_eq!(
            error(&e),
            "cannot connect: password authentication failed for user \"x\""
        );
    }

    #[test]
    fn redacts_password_in_url() {
        assert_eq!(
            url("postgres://u:hunter2@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(url("postgres://u@h/db"), "postgres://u@h/db");
    }

    #[test]
    fn url_passwords_are_masked_in_both_forms() {
        assert_eq!(
            url("postgres://u:hunter2@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            url("postgres://u@h/db?sslmode=require&password=hunter2&x=1"),
            "postgres://u@h/db?sslmode=require&password=***&x=1"
        );
        assert_eq!(url("postgres://u:p@ss@h/db"), "postgres://u:***@h/db");
    }

    #[test]
    fn keys_tokens_and_passwords_are_masked_in_free_text() {
        let key = "sk-proj-0123456789abcdefABCDEF";
        let echoed = format!("Incorrect API key provided: {key}. You can find your key at …");
        let r = secrets(&echoed, Some(key));
        assert!(!r.contains("0123456789"), "{r}");
        // Without being told the key, anything shaped like one is masked.
        let r = secrets(&echoed, None);
        assert!(!r.contains("0123456789"), "{r}");
        assert!(
            r.starts_with("Incorrect API key provided: [REDACTED]."),
            "{r}"
        );
        let r = secrets("sent Authorization: Bearer abc.def-123 to x", None);
        assert_eq!(r, "sent Authorization: Bearer [REDACTED] to x");
        let r = secrets(
            "connecting to postgres://w:s3cret@db/app?password=s3cret2 failed",
            None,
        );
        assert!(!r.contains("s3cret"), "{r}");
        // Ordinary words are left alone.
        assert_eq!(
            secrets("task-queue sk-short ok", None),
            "task-queue sk-short ok"
        );
    }
}

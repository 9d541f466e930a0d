//! The demo's request language: one UTF-8 command per request payload.
//!
//! | payload              | answer (JSON payload)                                 |
//! |----------------------|-------------------------------------------------------|
//! | `echo <text>`        | `{"zone","openid","seq_id","echo"}`                    |
//! | `whoami`             | `{"zone","openid","session_id","node_id","service"}`   |
//! | `join <room>`        | `{"room","members"}`                                   |
//! | `leave <room>`       | `{"room","members"}`                                   |
//! | `say <room> <text>`  | `{"room","pushed","failed"}`; pushes `chat` to members |
//! | `broadcast <text>`   | `{"queued","rejected"}`; pushes to the whole zone      |
//!
//! Parsing is pure (no IO) so it is tested on its own; [`crate::service`]
//! executes commands.

/// `ProcessRequestResponse.app_code` values of the demo. 0 is success; the
/// gateway passes any other value to the client unchanged.
pub mod app_code {
    /// The request succeeded.
    pub const OK: i32 = 0;
    /// The payload is not a known command.
    pub const UNKNOWN_COMMAND: i32 = 1;
    /// A known command with missing or malformed arguments.
    pub const BAD_ARGUMENTS: i32 = 2;
    /// `say` to a room the caller has not joined.
    pub const NOT_A_MEMBER: i32 = 3;
    /// The gateway refused or failed some pushes.
    pub const PUSH_FAILED: i32 = 4;
}

/// One parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<'a> {
    /// Answer the text back.
    Echo(&'a str),
    /// Who the gateway says the caller is.
    Whoami,
    /// Become a member of a room.
    Join(&'a str),
    /// Stop being a member of a room.
    Leave(&'a str),
    /// Push a chat message to every member of a room.
    Say {
        /// The room.
        room: &'a str,
        /// The message.
        text: &'a str,
    },
    /// Push a message to every session of this upstream's zone.
    Broadcast(&'a str),
}

/// Why a payload is not a command; becomes a non-zero `app_code`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The payload is not UTF-8.
    #[error("payload is not UTF-8")]
    NotUtf8,
    /// Unknown command word.
    #[error("unknown command {0:?}; try echo, whoami, join, leave, say, broadcast")]
    Unknown(String),
    /// Known command, wrong arguments.
    #[error("usage: {0}")]
    Usage(&'static str),
}

impl CommandError {
    /// The `app_code` to answer with.
    pub fn app_code(&self) -> i32 {
        match self {
            Self::NotUtf8 | Self::Usage(_) => app_code::BAD_ARGUMENTS,
            Self::Unknown(_) => app_code::UNKNOWN_COMMAND,
        }
    }
}

impl<'a> Command<'a> {
    /// Parses a request payload.
    pub fn parse(payload: &'a [u8]) -> Result<Self, CommandError> {
        let text = std::str::from_utf8(payload).map_err(|_| CommandError::NotUtf8)?;
        let text = text.trim();
        let (word, rest) = text.split_once(char::is_whitespace).unwrap_or((text, ""));
        let rest = rest.trim_start();
        let room = |usage| {
            let room = rest.trim();
            if room.is_empty() || room.contains(char::is_whitespace) {
                Err(CommandError::Usage(usage))
            } else {
                Ok(room)
            }
        };
        match word {
            "echo" => Ok(Self::Echo(rest)),
            "whoami" => Ok(Self::Whoami),
            "join" => room("join <room>").map(Self::Join),
            "leave" => room("leave <room>").map(Self::Leave),
            "say" => match rest.split_once(char::is_whitespace) {
                Some((room, text)) if !text.trim().is_empty() => Ok(Self::Say {
                    room,
                    text: text.trim_start(),
                }),
                _ => Err(CommandError::Usage("say <room> <text>")),
            },
            "broadcast" if !rest.is_empty() => Ok(Self::Broadcast(rest)),
            "broadcast" => Err(CommandError::Usage("broadcast <text>")),
            other => Err(CommandError::Unknown(other.chars().take(32).collect())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_command() {
        let cases: &[(&str, Command<'_>)] = &[
            ("echo hello world", Command::Echo("hello world")),
            ("echo", Command::Echo("")),
            ("  whoami ", Command::Whoami),
            ("join lobby", Command::Join("lobby")),
            ("leave lobby", Command::Leave("lobby")),
            (
                "say lobby hi  there",
                Command::Say {
                    room: "lobby",
                    text: "hi  there",
                },
            ),
            (
                "broadcast maintenance at 5",
                Command::Broadcast("maintenance at 5"),
            ),
        ];
        for (payload, command) in cases {
            assert_eq!(
                Command::parse(payload.as_bytes()).as_ref(),
                Ok(command),
                "{payload}"
            );
        }
    }

    #[test]
    fn rejects_bad_requests_with_an_app_code() {
        let cases = [
            (&b"dance"[..], app_code::UNKNOWN_COMMAND),
            (b"", app_code::UNKNOWN_COMMAND),
            (b"join", app_code::BAD_ARGUMENTS),
            (b"join two words", app_code::BAD_ARGUMENTS),
            (b"say lobby", app_code::BAD_ARGUMENTS),
            (b"broadcast", app_code::BAD_ARGUMENTS),
            (b"\xff\xfe", app_code::BAD_ARGUMENTS),
        ];
        for (payload, code) in cases {
            let err = Command::parse(payload).unwrap_err();
            assert_eq!(err.app_code(), code, "{payload:?}: {err}");
        }
    }
}

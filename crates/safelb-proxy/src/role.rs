//! Which of the two versions a request is served by, during a canary.

/// Which version serves a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Stable = 0,
    Candidate = 1,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Stable => "stable",
            Role::Candidate => "candidate",
        }
    }
}

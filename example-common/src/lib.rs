//! The example service shared by `example-provider` and `example-consumer`:
//! the [`UserService`] trait, its data types, and [`InMemoryUsers`], the
//! implementation the provider serves and the tests use.
//!
//! `#[rpc::service]` on the trait generates [`UserServiceServer`] (give it
//! to a provider) and [`UserServiceClient`] (call it from a consumer).
//! Application errors ([`AppError`]) travel as values: a client sees
//! `Ok(Err(AppError::NotFound { .. }))`, and `Err(RpcError)` only when the
//! call itself failed.
//!
//! ```
//! use example_common::{InMemoryUsers, UserServiceServer};
//! use rpc::transport::server::ServiceHandler;
//!
//! let server = UserServiceServer::new(InMemoryUsers::seeded());
//! assert_eq!(server.service_name(), "UserService");
//! assert_eq!(server.service_version(), "1.0");
//! assert!(server.methods().contains(&"get_user"));
//! ```
//!
//! On the consumer side:
//!
//! ```
//! use example_common::{AppError, UserServiceClient};
//!
//! async fn show(config: &rpc::RpcConfig) -> Result<(), rpc::RpcError> {
//!     let users = UserServiceClient::from_config(config).await?;
//!     match users.get_user(1).await? {
//!         Ok(user) => println!("{} <{}>", user.name, user.email),
//!         Err(AppError::NotFound { id }) => println!("no user {id}"),
//!         Err(other) => println!("{other}"),
//!     }
//!     Ok(())
//! }
//! ```

#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![warn(missing_debug_implementations, unreachable_pub)]

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};

/// Longest accepted user name, in characters.
pub const MAX_NAME_CHARS: usize = 64;

/// A user account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Unique id, assigned by the service.
    pub id: u64,
    /// Display name: non-empty, at most [`MAX_NAME_CHARS`] characters.
    pub name: String,
    /// Contact address.
    pub email: String,
    /// Free-form labels.
    pub tags: Vec<String>,
}

/// Application errors of [`UserService`]. They are part of a method's
/// return value, not RPC failures.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AppError {
    /// No user has this id.
    NotFound {
        /// The id asked for.
        id: u64,
    },
    /// The name is empty, too long, or contains control characters.
    InvalidName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: String,
    },
    /// The email address is not of the form `local@domain`.
    InvalidEmail {
        /// The rejected address.
        email: String,
    },
}

impl fmt::Display for AppError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotFound { id } => write!(f, "no user with id {id}"),
            Self::InvalidName { name, reason } => write!(f, "invalid name {name:?}: {reason}"),
            Self::InvalidEmail { email } => write!(f, "invalid email address {email:?}"),
        }
    }
}

impl std::error::Error for AppError {}

/// User accounts, by id.
#[rpc::service(version = "1.0")]
pub trait UserService {
    /// The user with this id. A read, safe to run twice: fail-over may
    /// retry it on another provider even after a lost connection.
    #[rpc(idempotent)]
    async fn get_user(&self, id: u64) -> Result<User, AppError>;

    /// All users, ordered by id.
    async fn list_users(&self) -> Vec<User>;

    /// Creates a user with a fresh id and returns it.
    async fn create_user(
        &self,
        name: String,
        email: String,
        tags: Vec<String>,
    ) -> Result<User, AppError>;

    /// Renames user `id` and returns the updated user.
    async fn rename(&self, id: u64, new_name: String) -> Result<User, AppError>;

    /// Deletes user `id`.
    async fn delete(&self, id: u64) -> Result<(), AppError>;

    /// Does nothing: a liveness check and the cheapest possible call.
    async fn ping(&self);

    /// Returns `data` unchanged: for payload-size experiments.
    async fn echo_bytes(&self, data: Vec<u8>) -> Vec<u8>;
}

/// An in-memory [`UserService`]: a map behind a mutex.
///
/// The lock is never held across an `.await` (there are none inside), so a
/// plain `std::sync::Mutex` is the right tool.
#[derive(Debug)]
pub struct InMemoryUsers {
    users: Mutex<HashMap<u64, User>>,
    next_id: AtomicU64,
}

impl InMemoryUsers {
    /// No users.
    #[must_use]
    pub fn new() -> Self {
        Self::with_users([])
    }

    /// Three well-known users, ids 1 to 3.
    #[must_use]
    pub fn seeded() -> Self {
        let user = |id, name: &str, email: &str, tags: &[&str]| User {
            id,
            name: name.to_owned(),
            email: email.to_owned(),
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        };
        Self::with_users([
            user(1, "Ada Lovelace", "ada@example.com", &["admin", "math"]),
            user(
                2,
                "Grace Murray",
                "grace@example.com",
                &["navy", "compilers"],
            ),
            user(3, "Alan Turing", "alan@example.com", &[]),
        ])
    }

    /// These users; new ids continue after the largest one.
    #[must_use]
    pub fn with_users(users: impl IntoIterator<Item = User>) -> Self {
        let users: HashMap<u64, User> = users.into_iter().map(|u| (u.id, u)).collect();
        let next_id = users.keys().max().map_or(1, |max| max.saturating_add(1));
        Self {
            users: Mutex::new(users),
            next_id: AtomicU64::new(next_id),
        }
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether there are no users.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, User>> {
        // Every update is a single map operation, so a panic elsewhere while
        // holding the lock cannot leave the map half-updated.
        self.users.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Default for InMemoryUsers {
    /// No users; ids start at 1.
    fn default() -> Self {
        Self::new()
    }
}

fn validate_name(name: &str) -> Result<(), AppError> {
    let reason = if name.trim().is_empty() {
        "must not be empty"
    } else if name.chars().count() > MAX_NAME_CHARS {
        "is too long"
    } else if name.chars().any(char::is_control) {
        "must not contain control characters"
    } else {
        return Ok(());
    };
    Err(AppError::InvalidName {
        name: name.to_owned(),
        reason: reason.to_owned(),
    })
}

fn validate_email(email: &str) -> Result<(), AppError> {
    match email.split_once('@') {
        Some((local, domain))
            if !local.is_empty() && !domain.is_empty() && !domain.contains('@') =>
        {
            Ok(())
        }
        _ => Err(AppError::InvalidEmail {
            email: email.to_owned(),
        }),
    }
}

impl UserService for InMemoryUsers {
    async fn get_user(&self, id: u64) -> Result<User, AppError> {
        self.lock()
            .get(&id)
            .cloned()
            .ok_or(AppError::NotFound { id })
    }

    async fn list_users(&self) -> Vec<User> {
        let mut users: Vec<User> = self.lock().values().cloned().collect();
        users.sort_by_key(|u| u.id);
        users
    }

    async fn create_user(
        &self,
        name: String,
        email: String,
        tags: Vec<String>,
    ) -> Result<User, AppError> {
        validate_name(&name)?;
        validate_email(&email)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let user = User {
            id,
            name,
            email,
            tags,
        };
        self.lock().insert(id, user.clone());
        Ok(user)
    }

    async fn rename(&self, id: u64, new_name: String) -> Result<User, AppError> {
        validate_name(&new_name)?;
        let mut users = self.lock();
        let user = users.get_mut(&id).ok_or(AppError::NotFound { id })?;
        user.name = new_name;
        Ok(user.clone())
    }

    async fn delete(&self, id: u64) -> Result<(), AppError> {
        self.lock()
            .remove(&id)
            .map(drop)
            .ok_or(AppError::NotFound { id })
    }

    async fn ping(&self) {}

    async fn echo_bytes(&self, data: Vec<u8>) -> Vec<u8> {
        data
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rpc::transport::server::{Call, Replier, ServiceHandler};
    use rpc::{SerializerKind, StatusCode};

    #[tokio::test]
    async fn seeded_users_can_be_read_renamed_and_deleted() {
        let users = InMemoryUsers::seeded();
        assert_eq!(users.len(), 3);
        assert_eq!(
            users.get_user(1).await.map(|u| u.name),
            Ok("Ada Lovelace".to_owned())
        );

        let renamed = users.rename(2, "Grace Hopper".to_owned()).await;
        assert_eq!(
            renamed.map(|u| (u.id, u.name)),
            Ok((2, "Grace Hopper".to_owned()))
        );
        assert_eq!(
            users.get_user(2).await.map(|u| u.name),
            Ok("Grace Hopper".to_owned())
        );

        assert_eq!(users.delete(3).await, Ok(()));
        assert_eq!(users.delete(3).await, Err(AppError::NotFound { id: 3 }));
        assert_eq!(users.get_user(3).await, Err(AppError::NotFound { id: 3 }));
        let ids: Vec<u64> = users.list_users().await.iter().map(|u| u.id).collect();
        assert_eq!(ids, [1, 2]);
    }

    #[tokio::test]
    async fn rename_rejects_unknown_ids_and_bad_names() {
        let users = InMemoryUsers::seeded();
        assert_eq!(
            users.rename(404, "Nobody".to_owned()).await,
            Err(AppError::NotFound { id: 404 })
        );
        for bad in ["", "   ", "tab\there", &"x".repeat(MAX_NAME_CHARS + 1)] {
            let err = users.rename(1, bad.to_owned()).await;
            assert!(
                matches!(err, Err(AppError::InvalidName { .. })),
                "{bad:?}: {err:?}"
            );
        }
        // A rejected rename leaves the user alone.
        assert_eq!(
            users.get_user(1).await.map(|u| u.name),
            Ok("Ada Lovelace".to_owned())
        );
    }

    #[tokio::test]
    async fn create_assigns_fresh_ids_and_validates() {
        let users = InMemoryUsers::seeded();
        let created = users
            .create_user(
                "Edsger Dijkstra".into(),
                "ewd@example.com".into(),
                vec!["goto".into()],
            )
            .await;
        assert_eq!(created.as_ref().map(|u| u.id), Ok(4));
        assert_eq!(users.get_user(4).await, created);
        assert_eq!(
            users
                .create_user("X".into(), "not-an-address".into(), vec![])
                .await,
            Err(AppError::InvalidEmail {
                email: "not-an-address".into()
            })
        );

        let empty = InMemoryUsers::new();
        assert!(empty.is_empty());
        let first = empty.create_user("A".into(), "a@b".into(), vec![]).await;
        assert_eq!(first.map(|u| u.id), Ok(1));
    }

    #[test]
    fn errors_read_well() {
        assert_eq!(
            AppError::NotFound { id: 9 }.to_string(),
            "no user with id 9"
        );
        let invalid = AppError::InvalidName {
            name: String::new(),
            reason: "must not be empty".into(),
        };
        assert_eq!(invalid.to_string(), "invalid name \"\": must not be empty");
    }

    /// The generated dispatcher passes application errors through as values.
    #[tokio::test]
    async fn server_dispatch_passes_app_errors_through() {
        // `Replier::encode` writes a whole response frame; the 18-byte header
        // is followed by the serialized value, which is also how arguments are
        // encoded in a request.
        const HEADER_LEN: usize = 18;
        let replier = Replier::new(1, SerializerKind::Json, 1 << 20);
        let args = replier
            .encode(&(404u64, "Nobody"))
            .map_err(|e| e.to_string());
        let args = args.as_deref().map(|frame| frame[HEADER_LEN..].to_vec());
        let Ok(args) = args else {
            panic!("cannot encode arguments: {args:?}");
        };
        assert_eq!(args, br#"[404,"Nobody"]"#);

        let server = UserServiceServer::new(InMemoryUsers::seeded());
        let call = Call {
            method: "rename",
            args: &args,
            replier,
            context: &rpc::Context::new("UserService:1.0", "m"),
        };
        let reply = match server.call(call) {
            Ok(future) => future.await,
            Err(e) => panic!("dispatch failed: {e}"),
        };
        let body = reply.as_deref().map(|frame| &frame[HEADER_LEN..]);
        assert_eq!(body, Ok(&br#"{"Err":{"NotFound":{"id":404}}}"#[..]));

        let call = Call {
            method: "no_such_method",
            args: b"[]",
            replier,
            context: &rpc::Context::new("UserService:1.0", "m"),
        };
        let status = server.call(call).err().map(|e| e.status);
        assert_eq!(status, Some(StatusCode::MethodNotFound));
    }
}

//! A database of its own on a PostgreSQL server, for the tests that need a real one: made
//! under a random name on the server `PARLOR_TEST_DATABASE_URL` names, and dropped, with
//! any connection left to it, when the value is dropped.

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, Executor, PgConnection};

/// A throwaway database (see the module).
#[doc(hidden)]
#[derive(Debug)]
pub struct ScratchDatabase {
    server: PgConnectOptions,
    name: String,
}

impl ScratchDatabase {
    /// Makes one, named `{prefix}_{random}`, on the server `PARLOR_TEST_DATABASE_URL` names;
    /// `Ok(None)` when the variable is unset, after saying that `tests` are skipped.
    pub async fn from_env(prefix: &str, tests: &str) -> Result<Option<Self>, sqlx::Error> {
        let Some(server) = std::env::var("PARLOR_TEST_DATABASE_URL")
            .ok()
            .filter(|u| !u.is_empty())
        else {
            eprintln!("skipped: set PARLOR_TEST_DATABASE_URL to run {tests}");
            return Ok(None);
        };
        let server: PgConnectOptions = server.parse()?;
        let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect_with(&server).await?;
        admin.execute(&*format!("CREATE DATABASE {name}")).await?;
        admin.close().await?;
        Ok(Some(Self { server, name }))
    }

    /// The server's URL with this database in place of its own.
    pub fn url(&self) -> String {
        self.server
            .clone()
            .database(&self.name)
            .to_url_lossy()
            .to_string()
    }
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        let (server, name) = (self.server.clone(), self.name.clone());
        // Drop may run inside a test's runtime; the clean-up gets a runtime of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut admin = PgConnection::connect_with(&server).await?;
                admin
                    .execute(&*format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await?;
                admin.close().await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test database {}: {dropped:?}", self.name);
        }
    }
}

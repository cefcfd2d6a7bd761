//! Updating an application from a savepoint, end to end: job v1 runs and is
//! stopped with a savepoint; job v2 starts from it, where one state's type
//! gained a field, renamed one with an alias and lost one (restored with no
//! code), one state was migrated by a function (dropping some entries), one
//! operator is gone (allow-non-restored-state), and one operator's uid was
//! renamed by an offline rewrite of the savepoint. Every key's state in v2
//! is checked against what v1 left in the savepoint plus the migration.
//! Also: incompatible changes are refused before any record is processed,
//! naming the operator, the state and both versions; an offline migration
//! restores at another parallelism into another backend; the source
//! savepoint is never modified.

use serde::{Deserialize, Serialize};
use sluice_backend_memory::{MemoryCheckpointStorage, MemoryStateBackend};
use sluice_backend_redb::RedbStateBackend;
use sluice_core::metadata::read_checkpoint_metadata;
use sluice_core::storage::latest_completed;
use sluice_core::{CheckpointStorage, StateBackend};
use sluice_runtime::prelude::*;
use sluice_runtime::rewrite::{rewrite_savepoint, SavepointRewrite};
use sluice_runtime::schema::{Evolvable, EvolvableValueState, Evolving, Migration};
use sluice_runtime::{read_keyed_entries, RestoreSource, SavepointLocation};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

const KEYS: u64 = 200;
const EVENTS: u64 = 2_000_000;

mod v1 {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Profile {
        pub name: String,
        pub visits: u64,
        pub legacy: u32,
    }
    impl Evolvable for Profile {
        const SCHEMA: &'static str = "test.Profile";
        const VERSION: u32 = 1;
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Balance {
        pub cents: i64,
    }
    impl Evolvable for Balance {
        const SCHEMA: &'static str = "test.Balance";
        const VERSION: u32 = 1;
    }
}

mod v2 {
    use super::*;

    /// Version 2: `name` renamed (alias), `tier` added (default),
    /// `legacy` removed.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Profile {
        #[serde(alias = "name")]
        pub display_name: String,
        pub visits: u64,
        #[serde(default)]
        pub tier: String,
    }
    impl Evolvable for Profile {
        const SCHEMA: &'static str = "test.Profile";
        const VERSION: u32 = 2;
    }

    /// Version 2: an amount with a currency instead of cents (not
    /// readable from version 1 without a migration).
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Balance {
        pub amount: String,
        pub currency: String,
    }
    impl Evolvable for Balance {
        const SCHEMA: &'static str = "test.Balance";
        const VERSION: u32 = 2;
    }

    /// The migration of balances: balances of a multiple of 5 cents are
    /// dropped.
    pub fn migrate(b: super::v1::Balance) -> Option<Balance> {
        (b.cents % 5 != 0).then(|| Balance {
            amount: format!("{}.{:02}", b.cents / 100, b.cents % 100),
            currency: "EUR".into(),
        })
    }
}

/// v1's accounts: a profile and a balance per key.
#[derive(Clone, Default)]
struct AccountsV1 {
    profile: Option<EvolvableValueState<v1::Profile>>,
    balance: Option<EvolvableValueState<v1::Balance>>,
}

impl KeyedProcessFunction<u64, (u64, u64), (u64, u64)> for AccountsV1 {
    fn open(&mut self, ctx: &mut OpenContext<'_>) -> Result<()> {
        self.profile = Some(ctx.evolvable_value_state("profile")?);
        self.balance = Some(ctx.evolvable_value_state("balance")?);
        Ok(())
    }
    fn process(
        &mut self,
        key: &u64,
        (k, i): (u64, u64),
        ctx: &mut KeyedContext<'_>,
        out: &mut Collector<'_, (u64, u64)>,
    ) -> Result<()> {
        self.profile.as_ref().unwrap().update(ctx, |p| {
            let p = p.get_or_insert_with(|| v1::Profile {
                name: format!("user-{key}"),
                visits: 0,
                legacy: 7,
            });
            p.visits += 1;
        })?;
        self.balance.as_ref().unwrap().update(ctx, |b| {
            b.get_or_insert(v1::Balance { cents: 0 }).cents += (i % 97) as i64;
        })?;
        out.collect((k, i))
    }
}

/// v1's counter (uid "counter", renamed "totals" for v2) and dedup (gone in v2).
#[derive(Clone, Default)]
struct Count(Option<ValueState<u64>>);

impl KeyedProcessFunction<u64, (u64, u64), (u64, u64)> for Count {
    fn open(&mut self, ctx: &mut OpenContext<'_>) -> Result<()> {
        self.0 = Some(ctx.value_state("count")?);
        Ok(())
    }
    fn process(
        &mut self,
        _key: &u64,
        r: (u64, u64),
        ctx: &mut KeyedContext<'_>,
        out: &mut Collector<'_, (u64, u64)>,
    ) -> Result<()> {
        self.0
            .as_ref()
            .unwrap()
            .update(ctx, |c| *c = Some(c.unwrap_or(0) + 1))?;
        out.collect(r)
    }
}

/// What v2 reports per key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Report {
    key: u64,
    profile: Option<v2::Profile>,
    balance: Option<v2::Balance>,
    count: Option<u64>,
}

#[derive(Clone, Default)]
struct AccountsV2 {
    migrate: bool,
    profile: Option<EvolvableValueState<v2::Profile>>,
    balance: Option<EvolvableValueState<v2::Balance>>,
}

impl KeyedProcessFunction<u64, Report, Report> for AccountsV2 {
    fn open(&mut self, ctx: &mut OpenContext<'_>) -> Result<()> {
        self.profile = Some(ctx.evolvable_value_state("profile")?);
        let migration = match self.migrate {
            true => Migration::new().from::<v1::Balance>(v2::migrate),
            false => Migration::new(),
        };
        self.balance = Some(ctx.evolvable_value_state_with("balance", migration)?);
        Ok(())
    }
    fn process(
        &mut self,
        _key: &u64,
        mut r: Report,
        ctx: &mut KeyedContext<'_>,
        out: &mut Collector<'_, Report>,
    ) -> Result<()> {
        r.profile = self.profile.as_ref().unwrap().get(ctx)?;
        r.balance = self.balance.as_ref().unwrap().get(ctx)?;
        out.collect(r)
    }
}

/// v2's count: v1's fixed `u64`, or (`evolve`) an evolvable [`Tally`]
/// migrated from it.
#[derive(Clone, Default)]
struct TotalsV2 {
    evolve: bool,
    fixed: Option<ValueState<u64>>,
    evolved: Option<EvolvableValueState<Tally>>,
}

/// The count, turned evolvable in v2.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Tally {
    n: u64,
    #[serde(default)]
    note: String,
}
impl Evolvable for Tally {
    const SCHEMA: &'static str = "test.Tally";
    const VERSION: u32 = 1;
}

impl KeyedProcessFunction<u64, Report, Report> for TotalsV2 {
    fn open(&mut self, ctx: &mut OpenContext<'_>) -> Result<()> {
        match self.evolve {
            false => self.fixed = Some(ctx.value_state("count")?),
            true => {
                let migration = Migration::new().from_fixed::<u64>(|n| {
                    Some(Tally {
                        n,
                        note: "from v1".into(),
                    })
                });
                self.evolved = Some(ctx.evolvable_value_state_with("count", migration)?);
            }
        }
        Ok(())
    }
    fn process(
        &mut self,
        _key: &u64,
        mut r: Report,
        ctx: &mut KeyedContext<'_>,
        out: &mut Collector<'_, Report>,
    ) -> Result<()> {
        r.count = match &self.evolved {
            Some(t) => t.get(ctx)?.map(|t| {
                assert_eq!(t.note, "from v1");
                t.n
            }),
            None => self.fixed.as_ref().unwrap().get(ctx)?,
        };
        out.collect(r)
    }
}

/// Runs v1 (paced) and stops it with a savepoint into `target`.
async fn run_v1(storage: Arc<dyn CheckpointStorage>, target: SavepointLocation) -> SavepointLocation {
    let job = Job::new("upgrade")
        .with_parallelism(2)
        .with_state_backend(Arc::new(MemoryStateBackend::new()))
        .with_checkpoint_storage(storage)
        .with_checkpointing(CheckpointConfig::every(Duration::from_millis(50)));
    job.source(
        "events",
        SequenceSource::new(EVENTS, 4, |i| (i % KEYS, i)).paced(200, Duration::from_millis(1)),
        2,
    )
    .key_by(|(k, _)| *k)
    .process("accounts", AccountsV1::default())
    .key_by(|(k, _)| *k)
    .process("counter", Count::default())
    .key_by(|(k, _)| *k)
    .process("dedup", Count::default())
    .sink(DiscardSink::new())
    .unwrap();
    let handle = job.start().unwrap();
    while handle.source_records() < 50_000 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let sp = handle.stop_with_savepoint(target).await.unwrap();
    let result = handle.wait().await.unwrap();
    assert!(result.stopped_with_savepoint.is_some());
    sp.location
}

/// Runs v2 from `from` over one probe per key; returns the reports by key.
async fn run_v2(
    from: SavepointLocation,
    backend: Arc<dyn StateBackend>,
    parallelism: u32,
    migrate: bool,
    counter_uid: &str,
) -> Result<BTreeMap<u64, Report>> {
    let storage = Arc::new(MemoryCheckpointStorage::new());
    run_v2_into(storage, from, backend, parallelism, migrate, counter_uid, false).await
}

/// [`run_v2`] with its checkpoints in `storage`.
async fn run_v2_into(
    storage: Arc<dyn CheckpointStorage>,
    from: SavepointLocation,
    backend: Arc<dyn StateBackend>,
    parallelism: u32,
    migrate: bool,
    counter_uid: &str,
    evolve_count: bool,
) -> Result<BTreeMap<u64, Report>> {
    let job = Job::new("upgrade")
        .with_parallelism(parallelism)
        .with_state_backend(backend)
        .with_checkpoint_storage(storage)
        .with_checkpointing(CheckpointConfig::every(Duration::from_millis(50)))
        .from_savepoint(from)
        .allow_non_restored_state(true);
    let probes: Vec<Report> = (0..KEYS)
        .map(|key| Report {
            key,
            profile: None,
            balance: None,
            count: None,
        })
        .collect();
    let sink = CollectSink::new();
    // A new source: v1's source positions (uid "events") are not restored
    // (allow-non-restored-state), nothing of v1's input is replayed.
    job.source("probes", VecSource::new(probes, 4), parallelism)
        .key_by(|r: &Report| r.key)
        .process(
            "accounts",
            AccountsV2 {
                migrate,
                ..Default::default()
            },
        )
        .key_by(|r: &Report| r.key)
        .process(
            counter_uid,
            TotalsV2 {
                evolve: evolve_count,
                ..Default::default()
            },
        )
        .sink(sink.clone())?;
    job.start()?.wait().await?;
    Ok(sink.items().into_iter().map(|r| (r.key, r)).collect())
}

/// One key's state in v1: profile, balance, count.
type V1State = (Option<v1::Profile>, Option<v1::Balance>, Option<u64>);

/// What v1 left, per key, read from the savepoint's files.
async fn v1_state(sp: &SavepointLocation) -> BTreeMap<u64, V1State> {
    let source = RestoreSource::open(sp).await.unwrap();
    let mut out: BTreeMap<u64, V1State> = BTreeMap::new();
    for uid in ["accounts", "counter"] {
        let op = source
            .metadata
            .operators
            .iter()
            .find(|o| o.uid.as_str() == uid)
            .unwrap();
        for ((state, _, k), v) in read_keyed_entries(source.storage.as_ref(), &sp.dir, op)
            .await
            .unwrap()
        {
            let key: u64 = postcard::from_bytes(&k).unwrap();
            let e = out.entry(key).or_default();
            match state.as_str() {
                "profile" => e.0 = Some(postcard::from_bytes::<Evolving<v1::Profile>>(&v).unwrap().0),
                "balance" => e.1 = Some(postcard::from_bytes::<Evolving<v1::Balance>>(&v).unwrap().0),
                "count" => e.2 = Some(postcard::from_bytes::<u64>(&v).unwrap()),
                other => panic!("unexpected state {other}"),
            }
        }
    }
    out
}

/// What v2 must see for a key v1 left as `v1`.
fn expected(v1: &V1State) -> (Option<v2::Profile>, Option<v2::Balance>, Option<u64>) {
    (
        v1.0.as_ref().map(|p| v2::Profile {
            display_name: p.name.clone(),
            visits: p.visits,
            tier: String::new(),
        }),
        v1.1.clone().and_then(v2::migrate),
        v1.2,
    )
}

/// Every file of `dir` with its bytes.
async fn snapshot_of(storage: &Arc<dyn CheckpointStorage>, dir: &str) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    for f in storage.list_files(dir).await.unwrap() {
        let bytes = storage.read(&f.path, None).await.unwrap();
        files.insert(f.path, bytes.to_vec());
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upgrade_story_end_to_end() {
    let storage: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    let targets: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    let sp = run_v1(storage, SavepointLocation::new(targets.clone(), "sp").unwrap()).await;
    let left = v1_state(&sp).await;
    assert_eq!(left.len() as u64, KEYS, "v1 saw every key before the savepoint");
    for (key, (profile, _, count)) in &left {
        // Both operators saw each record once: the savepoint is consistent.
        assert_eq!(Some(profile.as_ref().unwrap().visits), *count, "key {key}");
    }
    let before = snapshot_of(&targets, &sp.dir).await;

    // The uid of the counter is renamed offline.
    let renamed = SavepointLocation::new(targets.clone(), "renamed").unwrap();
    let meta = rewrite_savepoint(
        &sp,
        &renamed,
        &SavepointRewrite::new().rename_operator("counter", "totals"),
    )
    .await
    .unwrap();
    let uids: Vec<&str> = meta.operators.iter().map(|o| o.uid.as_str()).collect();
    assert!(uids.contains(&"totals") && !uids.contains(&"counter"), "{uids:?}");
    assert_eq!(
        snapshot_of(&targets, &sp.dir).await,
        before,
        "the source savepoint is unchanged"
    );

    let reports = run_v2(renamed, Arc::new(MemoryStateBackend::new()), 2, true, "totals")
        .await
        .unwrap();
    assert_eq!(reports.len() as u64, KEYS);
    let mut dropped = 0;
    for (key, r) in &reports {
        let (profile, balance, count) = expected(&left[key]);
        assert_eq!(r.profile, profile, "key {key}");
        assert_eq!(r.balance, balance, "key {key}");
        assert_eq!(r.count, count, "key {key}");
        dropped += usize::from(left[key].1.is_some() && balance.is_none());
    }
    assert!(dropped > 0, "some balances were dropped by the migration");
}

/// v1 stopped with a savepoint, and what it left there.
async fn v1_savepoint() -> (SavepointLocation, BTreeMap<u64, V1State>) {
    let storage: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    let targets: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    let sp = run_v1(storage, SavepointLocation::new(targets, "sp").unwrap()).await;
    let left = v1_state(&sp).await;
    (sp, left)
}

/// The memory backend and a redb backend with its files in `dir`.
fn both_backends(dir: &std::path::Path) -> [(&'static str, Arc<dyn StateBackend>); 2] {
    [
        ("memory", Arc::new(MemoryStateBackend::new())),
        ("redb", Arc::new(RedbStateBackend::new(dir).unwrap())),
    ]
}

/// A state that was fixed (`u64`) becomes evolvable through
/// `Migration::from_fixed`, on either backend; every key's count is v1's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_state_becomes_evolvable_through_a_migration() {
    let (sp, left) = v1_savepoint().await;
    let dir = tempfile::tempdir().unwrap();
    for (name, backend) in both_backends(dir.path()) {
        let checkpoints = Arc::new(MemoryCheckpointStorage::new());
        let reports = run_v2_into(checkpoints, sp.clone(), backend, 3, true, "counter", true)
            .await
            .unwrap();
        assert_eq!(reports.len() as u64, KEYS, "{name}");
        for (key, r) in &reports {
            let count = left[key].2.unwrap_or_else(|| panic!("v1 counted key {key}"));
            assert_eq!(r.count, Some(count), "{name}: key {key}");
        }
    }
}

mod v3 {
    use super::*;

    /// Version 3: the alias of version 2's rename is gone (every value
    /// written since version 2 has `display_name`).
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Profile {
        #[serde(default)]
        pub display_name: String,
        pub visits: u64,
        #[serde(default)]
        pub tier: String,
    }
}

/// A state restored from an older version of its schema without a
/// migration is written anew in the new version: a later version that
/// drops the old field names (the alias) reads every value, also those v2
/// never touched, on either backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_restored_from_an_older_version_are_rewritten_in_the_new_one() {
    let (sp, left) = v1_savepoint().await;
    let dir = tempfile::tempdir().unwrap();
    for (name, backend) in both_backends(dir.path()) {
        let checkpoints: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
        run_v2_into(
            checkpoints.clone(),
            sp.clone(),
            backend,
            2,
            true,
            "counter",
            false,
        )
        .await
        .unwrap();
        // v2's last checkpoint, read as v3 would read it.
        let id = latest_completed(checkpoints.as_ref()).await.unwrap().unwrap();
        let meta = read_checkpoint_metadata(checkpoints.as_ref(), id).await.unwrap();
        let op = meta
            .operators
            .iter()
            .find(|o| o.uid.as_str() == "accounts")
            .unwrap();
        let mut profiles = 0;
        for ((state, _, k), v) in read_keyed_entries(checkpoints.as_ref(), "", op).await.unwrap() {
            if state != "profile" {
                continue;
            }
            let key: u64 = postcard::from_bytes(&k).unwrap();
            let p = postcard::from_bytes::<Evolving<v3::Profile>>(&v).unwrap().0;
            let was = left[&key].0.as_ref().unwrap();
            assert_eq!(p.display_name, was.name, "{name}: key {key}");
            assert_eq!(p.visits, was.visits, "{name}: key {key}");
            profiles += 1;
        }
        assert_eq!(profiles, KEYS, "{name}: every key's profile");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incompatible_changes_are_refused_before_any_record_naming_the_state_and_versions() {
    let storage: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    let targets: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    let sp = run_v1(storage, SavepointLocation::new(targets.clone(), "sp").unwrap()).await;
    // Balance v1 -> v2 without its migration: v1 values do not read as v2.
    let err = run_v2(
        sp.clone(),
        Arc::new(MemoryStateBackend::new()),
        2,
        false,
        "counter",
    )
    .await
    .unwrap_err()
    .to_string();
    for needle in [
        "\"balance\"",
        "accounts",
        "test.Balance v1",
        "test.Balance v2",
        "migration",
    ] {
        assert!(err.contains(needle), "{needle:?} missing from: {err}");
    }
    // The same on the redb backend, which keeps bytes: refused before use.
    let dir = tempfile::tempdir().unwrap();
    let err = run_v2(
        sp.clone(),
        Arc::new(RedbStateBackend::new(dir.path()).unwrap()),
        2,
        false,
        "counter",
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("test.Balance v1") && err.contains("does not read"),
        "{err}"
    );

    // A state of another schema with no migration from it.
    #[derive(Clone, Default)]
    struct Other(Option<EvolvableValueState<Unrelated>>);
    #[derive(Debug, Clone, Serialize, Deserialize)]
    struct Unrelated {
        x: u8,
    }
    impl Evolvable for Unrelated {
        const SCHEMA: &'static str = "test.Unrelated";
        const VERSION: u32 = 1;
    }
    impl KeyedProcessFunction<u64, (u64, u64), (u64, u64)> for Other {
        fn open(&mut self, ctx: &mut OpenContext<'_>) -> Result<()> {
            self.0 = Some(ctx.evolvable_value_state("balance")?);
            Ok(())
        }
        fn process(
            &mut self,
            _: &u64,
            _: (u64, u64),
            _: &mut KeyedContext<'_>,
            _: &mut Collector<'_, (u64, u64)>,
        ) -> Result<()> {
            panic!("no record may be processed")
        }
    }
    let job = Job::new("upgrade")
        .with_parallelism(2)
        .with_state_backend(Arc::new(MemoryStateBackend::new()))
        .with_checkpoint_storage(Arc::new(MemoryCheckpointStorage::new()))
        .from_savepoint(sp)
        .allow_non_restored_state(true);
    job.source("events-v3", SequenceSource::new(10, 4, |i| (i, i)), 2)
        .key_by(|(k, _)| *k)
        .process("accounts", Other::default())
        .sink(DiscardSink::new())
        .unwrap();
    let err = job.start().unwrap().wait().await.unwrap_err().to_string();
    assert!(
        err.contains("test.Balance v1") && err.contains("test.Unrelated v1") && err.contains("no migration"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_migration_restores_at_another_parallelism_into_redb() {
    let storage: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    let targets: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    let sp = run_v1(storage, SavepointLocation::new(targets.clone(), "sp").unwrap()).await;
    let left = v1_state(&sp).await;
    let before = snapshot_of(&targets, &sp.dir).await;
    let out = SavepointLocation::new(targets.clone(), "migrated").unwrap();
    let plan = SavepointRewrite::new()
        .migrate_state(
            "accounts",
            "balance",
            Migration::new().from::<v1::Balance>(v2::migrate),
        )
        .drop_operator("dedup");
    let meta = rewrite_savepoint(&sp, &out, &plan).await.unwrap();
    assert!(meta.operators.iter().all(|o| o.uid.as_str() != "dedup"));
    let accounts = meta
        .operators
        .iter()
        .find(|o| o.uid.as_str() == "accounts")
        .unwrap();
    let balance = accounts.states.iter().find(|s| s.name == "balance").unwrap();
    assert_eq!(balance.schema.as_ref().unwrap().version, 2);
    assert_eq!(
        snapshot_of(&targets, &sp.dir).await,
        before,
        "the source savepoint is unchanged"
    );

    // Relocated (copied elsewhere) it still restores: self-contained.
    let elsewhere: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    let copy = SavepointLocation::new(elsewhere, "copy").unwrap();
    sluice_runtime::copy_savepoint(&out, &copy).await.unwrap();

    // The migration already ran offline: v2 registers no step.
    let dir = tempfile::tempdir().unwrap();
    let reports = run_v2(
        copy,
        Arc::new(RedbStateBackend::new(dir.path()).unwrap()),
        3,
        false,
        "counter",
    )
    .await
    .unwrap();
    assert_eq!(reports.len() as u64, KEYS);
    for (key, r) in &reports {
        let (profile, balance, count) = expected(&left[key]);
        assert_eq!(
            (&r.profile, &r.balance, &r.count),
            (&profile, &balance, &count),
            "key {key}"
        );
    }

    // Bad plans are refused, naming what is wrong.
    let bad = SavepointLocation::new(targets.clone(), "bad").unwrap();
    let err = rewrite_savepoint(&sp, &bad, &SavepointRewrite::new().rename_operator("nope", "x"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"nope\"") && err.contains("accounts"), "{err}");
    let err = rewrite_savepoint(
        &sp,
        &bad,
        &SavepointRewrite::new().migrate_state(
            "accounts",
            "profile",
            Migration::new().from::<v1::Balance>(v2::migrate),
        ),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("test.Profile v1") && err.contains("no step"),
        "{err}"
    );
    let twice = SavepointRewrite::new()
        .migrate_state(
            "accounts",
            "balance",
            Migration::new().from::<v1::Balance>(v2::migrate),
        )
        .migrate_state(
            "accounts",
            "balance",
            Migration::new().from::<v1::Balance>(v2::migrate),
        );
    let err = rewrite_savepoint(&sp, &bad, &twice)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("migrated twice"), "{err}");
    assert!(
        targets.list_files("bad").await.unwrap().is_empty(),
        "nothing written for a refused plan"
    );
}

/// v1 with an evolvable list (a balance history) and an evolvable map
/// (friends' profiles by id).
#[derive(Clone, Default)]
struct BagV1 {
    history: Option<sluice_runtime::schema::EvolvableListState<v1::Balance>>,
    friends: Option<sluice_runtime::schema::EvolvableMapState<u64, v1::Profile>>,
}

impl KeyedProcessFunction<u64, (u64, u64), (u64, u64)> for BagV1 {
    fn open(&mut self, ctx: &mut OpenContext<'_>) -> Result<()> {
        self.history = Some(ctx.evolvable_list_state_with("history", Migration::new())?);
        self.friends = Some(ctx.evolvable_map_state_with("friends", Migration::new())?);
        Ok(())
    }
    fn process(
        &mut self,
        key: &u64,
        (k, i): (u64, u64),
        ctx: &mut KeyedContext<'_>,
        out: &mut Collector<'_, (u64, u64)>,
    ) -> Result<()> {
        let history = self.history.as_ref().unwrap();
        if history.get(ctx)?.len() < 6 {
            history.add(
                ctx,
                v1::Balance {
                    cents: (i % 23) as i64,
                },
            )?;
        }
        let friend = i % 3;
        self.friends.as_ref().unwrap().put(
            ctx,
            &friend,
            v1::Profile {
                name: format!("friend-{key}-{friend}"),
                visits: i,
                legacy: 1,
            },
        )?;
        out.collect((k, i))
    }
}

/// What v2 reports per key: the list and the map.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct BagReport {
    key: u64,
    history: Vec<v2::Balance>,
    friends: BTreeMap<u64, v2::Profile>,
}

#[derive(Clone, Default)]
struct BagV2 {
    history: Option<sluice_runtime::schema::EvolvableListState<v2::Balance>>,
    friends: Option<sluice_runtime::schema::EvolvableMapState<u64, v2::Profile>>,
}

impl KeyedProcessFunction<u64, BagReport, BagReport> for BagV2 {
    fn open(&mut self, ctx: &mut OpenContext<'_>) -> Result<()> {
        let migration = Migration::new().from::<v1::Balance>(v2::migrate);
        self.history = Some(ctx.evolvable_list_state_with("history", migration)?);
        self.friends = Some(ctx.evolvable_map_state_with("friends", Migration::new())?);
        Ok(())
    }
    fn process(
        &mut self,
        _key: &u64,
        mut r: BagReport,
        ctx: &mut KeyedContext<'_>,
        out: &mut Collector<'_, BagReport>,
    ) -> Result<()> {
        r.history = self.history.as_ref().unwrap().get(ctx)?;
        r.friends = self.friends.as_ref().unwrap().entries(ctx)?.into_iter().collect();
        out.collect(r)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evolvable_lists_and_maps_migrate_element_by_element() {
    let targets: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    let job = Job::new("bag")
        .with_parallelism(2)
        .with_state_backend(Arc::new(MemoryStateBackend::new()))
        .with_checkpoint_storage(Arc::new(MemoryCheckpointStorage::new()))
        .with_checkpointing(CheckpointConfig::every(Duration::from_millis(50)));
    job.source(
        "events",
        SequenceSource::new(EVENTS, 4, |i| (i % KEYS, i)).paced(200, Duration::from_millis(1)),
        2,
    )
    .key_by(|(k, _)| *k)
    .process("bag", BagV1::default())
    .sink(DiscardSink::new())
    .unwrap();
    let handle = job.start().unwrap();
    while handle.source_records() < 20_000 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let sp = handle
        .stop_with_savepoint(SavepointLocation::new(targets.clone(), "sp").unwrap())
        .await
        .unwrap()
        .location;
    handle.wait().await.unwrap();

    // What v1 left: lists of v1 balances, map entries of v1 profiles
    // (an entry's key: u32 LE length of the key, the key, the map key).
    let source = RestoreSource::open(&sp).await.unwrap();
    let op = source
        .metadata
        .operators
        .iter()
        .find(|o| o.uid.as_str() == "bag")
        .unwrap();
    let mut expected: BTreeMap<u64, BagReport> = BTreeMap::new();
    let mut dropped_elements = 0;
    for ((state, _, k), v) in read_keyed_entries(source.storage.as_ref(), &sp.dir, op)
        .await
        .unwrap()
    {
        let (key_bytes, rest) = match state.as_str() {
            "friends" => {
                let len = u32::from_le_bytes(k[..4].try_into().unwrap()) as usize;
                (&k[4..4 + len], &k[4 + len..])
            }
            _ => (&k[..], &k[..0]),
        };
        let key: u64 = postcard::from_bytes(key_bytes).unwrap();
        let e = expected.entry(key).or_insert_with(|| BagReport {
            key,
            history: Vec::new(),
            friends: BTreeMap::new(),
        });
        match state.as_str() {
            "history" => {
                let list: Vec<Evolving<v1::Balance>> = postcard::from_bytes(&v).unwrap();
                let before = list.len();
                e.history = list.into_iter().filter_map(|b| v2::migrate(b.0)).collect();
                dropped_elements += before - e.history.len();
            }
            "friends" => {
                let p = postcard::from_bytes::<Evolving<v1::Profile>>(&v).unwrap().0;
                let friend: u64 = postcard::from_bytes(rest).unwrap();
                e.friends.insert(
                    friend,
                    v2::Profile {
                        display_name: p.name,
                        visits: p.visits,
                        tier: String::new(),
                    },
                );
            }
            other => panic!("unexpected state {other}"),
        }
    }
    assert_eq!(expected.len() as u64, KEYS);
    assert!(
        dropped_elements > 0,
        "some list elements are dropped by the migration"
    );

    let dir = tempfile::tempdir().unwrap();
    let job = Job::new("bag")
        .with_parallelism(3)
        .with_state_backend(Arc::new(RedbStateBackend::new(dir.path()).unwrap()))
        .with_checkpoint_storage(Arc::new(MemoryCheckpointStorage::new()))
        .from_savepoint(sp)
        .allow_non_restored_state(true);
    let probes: Vec<BagReport> = (0..KEYS)
        .map(|key| BagReport {
            key,
            history: Vec::new(),
            friends: BTreeMap::new(),
        })
        .collect();
    let sink = CollectSink::new();
    job.source("probes", VecSource::new(probes, 4), 3)
        .key_by(|r: &BagReport| r.key)
        .process("bag", BagV2::default())
        .sink(sink.clone())
        .unwrap();
    job.start().unwrap().wait().await.unwrap();
    let seen: BTreeMap<u64, BagReport> = sink.items().into_iter().map(|r| (r.key, r)).collect();
    // (An emptied list was removed: it reads as empty, as expected.)
    for (key, want) in &expected {
        assert_eq!(&seen[key], want, "key {key}");
    }
}

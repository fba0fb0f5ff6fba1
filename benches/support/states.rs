//! Realistic user states for the state benches (`checkpoint`, `restore`): generator
//! events applied through the reference topology's `FeatureSet`, as the stream does.

use std::collections::HashMap;

use augur::config::Topology;
use augur::features::Scratch;
use augur::gen::Generator;
use augur::state::UserState;

/// Every user's state after `events` generator events (50 ms apart) for `users` users.
pub fn scenario_states(
    topology: &Topology,
    seed: u64,
    users: u32,
    events: i64,
) -> HashMap<String, UserState> {
    let features = topology.feature_set();
    let mut generator = Generator::new(seed, users);
    let mut states: HashMap<String, UserState> = HashMap::new();
    let mut out = vec![0.0; features.len()];
    let mut scratch = Scratch::default();
    for i in 0..events {
        let event = generator.next_event(1_767_225_600_000 + i * 50);
        let state = states
            .entry(event.user_id.clone())
            .or_insert_with(|| features.new_state());
        features
            .apply_event(state, &event, &mut out, &mut scratch)
            .unwrap();
    }
    states
}

/// A temporary directory under the cargo target directory: the VM's real disk, not a
/// tmpfs, as a worker's state dir would be.
pub fn tempdir_under_target() -> tempfile::TempDir {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    std::fs::create_dir_all(&target).unwrap();
    tempfile::tempdir_in(&target).unwrap()
}

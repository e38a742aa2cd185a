//! A three-node RabbitMQ cluster built for one test and removed when it is dropped.
//!
//! The nodes are `rabbit-c1@localhost` to `rabbit-c3@localhost`, with AMQP on 127.0.0.1 ports 5681 to 5683 and
//! Erlang distribution on ports 25681 to 25683. The distribution ports are set explicitly, because the default
//! (AMQP port + 20000) would collide with other nodes on this machine. Each node has its own config file, data
//! and log directories in a temporary directory owned by the rabbitmq user. The nodes share the machine's epmd
//! and Erlang cookie but never join the machine's own node. Starting them needs root, to run them as the
//! rabbitmq user with a raised open-file limit.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// First AMQP port; node `i` (0-based) listens on `AMQP_PORT_BASE + 1 + i`.
const AMQP_PORT_BASE: u16 = 5680;
/// First distribution port; node `i` uses `DIST_PORT_BASE + 1 + i`.
const DIST_PORT_BASE: u16 = 25680;
/// Deadline for one node to start or to join the cluster.
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// Deadline for one node's graceful stop at the end; past it the node is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// Open-file limit of the nodes (capped at the hard limit). `rabbitmq-server` started as root switches to the
/// rabbitmq user with su, which resets the limit to 1,024. On RabbitMQ 3.10.8 every quorum queue replica
/// reserves three handles in the broker's file handle cache (902 of 927 in use after 300 replicas per node), and
/// a node whose cache is full stops accepting new connections: at 1,024 that happens near 300 mailboxes.
const NODE_OPEN_FILES: u64 = 20_000;

/// Returns the programs and rights the cluster needs that are missing: `rabbitmq-server`, `rabbitmqctl`, root.
pub fn missing_prerequisites() -> Vec<String> {
    let mut missing = Vec::new();
    for program in ["rabbitmq-server", "rabbitmqctl"] {
        if find_program(program).is_none() {
            missing.push(format!(
                "{program} is not installed (not in PATH or /usr/sbin)"
            ));
        }
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.push(
            "the test is not running as root, which it needs to start RabbitMQ nodes as the rabbitmq user"
                .to_owned(),
        );
    }
    missing
}

/// Returns true when a cluster can be built. Panics when it cannot and CI=true, so CI never skips the test.
pub fn cluster_available() -> bool {
    let missing = missing_prerequisites();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "cannot build a RabbitMQ cluster, and CI=true requires it: {}",
            missing.join("; ")
        );
    }
    eprintln!(
        "skipping: cannot build a RabbitMQ cluster ({}); set CI=true to make this a failure",
        missing.join("; ")
    );
    false
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([
            PathBuf::from("/usr/sbin"),
            PathBuf::from("/usr/lib/rabbitmq/bin"),
        ])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// One RabbitMQ node of the cluster.
pub struct RabbitNode {
    /// Erlang node name, such as `rabbit-c1@localhost`.
    pub name: String,
    pub amqp_port: u16,
    dist_port: u16,
    dir: PathBuf,
    /// True after [`RabbitCluster::prepare_kill`]; a killed node is not stopped again.
    pub killed: bool,
}

impl RabbitNode {
    fn pid_file(&self) -> PathBuf {
        self.dir.join("pid")
    }

    /// Reads the beam process id from the node's pid file.
    fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.pid_file())
            .ok()
            .and_then(|text| text.trim().parse().ok())
    }
}

/// Three clustered RabbitMQ nodes. Dropping it stops every node (killing any that does not stop) and deletes
/// their directories, also when the test panicked.
pub struct RabbitCluster {
    pub nodes: Vec<RabbitNode>,
    base: tempfile::TempDir,
}

impl RabbitCluster {
    /// Starts three nodes, joins the second and third to the first and waits until all three run.
    pub fn start() -> RabbitCluster {
        let base = tempfile::Builder::new()
            .prefix("wsgw-cluster-")
            .tempdir()
            .expect("create a temporary directory for the cluster");
        let mut cluster = RabbitCluster {
            nodes: Vec::new(),
            base,
        };
        for index in 0..3u16 {
            let name = format!("rabbit-c{}@localhost", index + 1);
            stop_leftover(&name);
            let node = RabbitNode {
                name,
                amqp_port: AMQP_PORT_BASE + 1 + index,
                dist_port: DIST_PORT_BASE + 1 + index,
                dir: cluster.base.path().join(format!("c{}", index + 1)),
                killed: false,
            };
            assert_port_free(node.amqp_port);
            assert_port_free(node.dist_port);
            prepare_node_dir(&node);
            cluster.nodes.push(node);
        }
        run_checked(
            Command::new("chown")
                .args(["-R", "rabbitmq:rabbitmq"])
                .arg(cluster.base.path()),
            "chown the cluster directory to the rabbitmq user",
        );

        // The nodes boot in parallel; each boot takes several seconds.
        let user = RabbitUser::look_up();
        for node in &cluster.nodes {
            let mut command = user.command(&server_script());
            command
                .arg("-detached")
                .env("RABBITMQ_NODENAME", &node.name)
                .env("RABBITMQ_NODE_PORT", node.amqp_port.to_string())
                .env("RABBITMQ_DIST_PORT", node.dist_port.to_string())
                .env("RABBITMQ_CONFIG_FILE", node.dir.join("rabbitmq.conf"))
                .env("RABBITMQ_MNESIA_BASE", node.dir.join("mnesia"))
                .env("RABBITMQ_LOG_BASE", node.dir.join("log"))
                .env("RABBITMQ_PID_FILE", node.pid_file())
                .env("RABBITMQ_ENABLED_PLUGINS_FILE", node.dir.join("plugins"));
            run_checked(&mut command, &format!("start RabbitMQ node {}", node.name));
        }
        for node in &cluster.nodes {
            let pid_file = node.pid_file();
            let timeout = START_TIMEOUT.as_secs().to_string();
            cluster.ctl(
                node,
                &["wait", &pid_file.to_string_lossy(), "--timeout", &timeout],
            );
        }
        let first = cluster.nodes[0].name.clone();
        for node in &cluster.nodes[1..] {
            cluster.ctl(node, &["stop_app"]);
            cluster.ctl(node, &["join_cluster", &first]);
            cluster.ctl(node, &["start_app"]);
        }
        for node in &cluster.nodes {
            cluster.ctl(node, &["await_startup"]);
            let limit = node.pid().and_then(open_file_limit);
            assert!(
                limit.is_some_and(|limit| limit >= 4_096),
                "node {} runs with an open-file limit of {limit:?}; quorum mailboxes need far more",
                node.name
            );
        }
        let status = cluster.ctl(
            &cluster.nodes[0],
            &["cluster_status", "--formatter", "json"],
        );
        for node in &cluster.nodes {
            assert!(
                status.contains(&node.name),
                "node {} is not in the cluster: {status}",
                node.name
            );
        }
        cluster
    }

    /// Returns the AMQP URL of node `index`.
    pub fn url(&self, index: usize) -> String {
        format!(
            "amqp://guest:guest@127.0.0.1:{}/%2f",
            self.nodes[index].amqp_port
        )
    }

    /// Returns every node's URL, starting with node `first` and wrapping around.
    pub fn urls_from(&self, first: usize) -> Vec<String> {
        (0..self.nodes.len())
            .map(|offset| self.url((first + offset) % self.nodes.len()))
            .collect()
    }

    /// Runs `rabbitmqctl -n <node> ARGS` and returns its output; panics with the output when it fails.
    pub fn ctl(&self, node: &RabbitNode, args: &[&str]) -> String {
        let output = Command::new("rabbitmqctl")
            .arg("-n")
            .arg(&node.name)
            .args(args)
            .output()
            .unwrap_or_else(|error| panic!("rabbitmqctl {args:?} could not run: {error}"));
        assert!(
            output.status.success(),
            "rabbitmqctl -n {} {args:?} failed: {}{}",
            node.name,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Lists the leader node of every quorum queue whose name starts with `prefix`, read through node `via`.
    pub fn leaders(&self, via: usize, prefix: &str) -> Vec<(String, String)> {
        let listing = self.ctl(
            &self.nodes[via],
            &["list_queues", "-q", "--formatter", "json", "name", "leader"],
        );
        let rows: Vec<serde_json::Value> = serde_json::from_str(&listing)
            .unwrap_or_else(|error| panic!("list_queues printed no JSON ({error}): {listing}"));
        rows.iter()
            .filter_map(|row| {
                let name = row["name"].as_str()?;
                let leader = row["leader"].as_str()?;
                name.starts_with(prefix)
                    .then(|| (name.to_owned(), leader.to_owned()))
            })
            .collect()
    }

    /// Reads the memory (`erlang:memory(total)`, bytes) and the file handle cache use of node `index`.
    pub fn resources(&self, index: usize) -> String {
        self.ctl(
            &self.nodes[index],
            &[
                "eval",
                "{erlang:memory(total), file_handle_cache:info([total_used, total_limit])}.",
            ],
        )
        .trim()
        .to_owned()
    }

    /// Returns the index of the node named `name`.
    pub fn index_of(&self, name: &str) -> usize {
        self.nodes
            .iter()
            .position(|node| node.name == name)
            .unwrap_or_else(|| panic!("{name} is not a node of the test cluster"))
    }

    /// Marks node `index` as killed and returns its beam process id, for [`kill_process`] to kill it as a
    /// crash would. A node marked killed is not stopped gracefully at the end.
    pub fn prepare_kill(&mut self, index: usize) -> i32 {
        let node = &mut self.nodes[index];
        node.killed = true;
        node.pid()
            .unwrap_or_else(|| panic!("node {} has no pid file", node.name))
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.keep_logs();
        }
        // Graceful stops in parallel, each bounded; a node that is still running afterwards is killed.
        let stops: Vec<_> = self
            .nodes
            .iter()
            .filter(|node| !node.killed && node.pid().is_some())
            .map(|node| {
                let name = node.name.clone();
                std::thread::spawn(move || {
                    let mut command = Command::new("rabbitmqctl");
                    command.args(["-n", &name, "stop"]);
                    run_bounded(command, STOP_TIMEOUT);
                })
            })
            .collect();
        for stop in stops {
            let _ = stop.join();
        }
        for node in &self.nodes {
            if let Some(pid) = node.pid()
                && process_exists(pid)
            {
                if !node.killed {
                    eprintln!("RabbitMQ node {} did not stop; killing it", node.name);
                }
                kill_process(pid);
            }
        }
        // The TempDir removes the node directories when it drops after this.
    }
}

impl RabbitCluster {
    /// Copies every node's log directory to a directory that outlives the test, and prints where.
    fn keep_logs(&self) {
        let kept = std::env::temp_dir().join(format!("wsgw-cluster-logs-{}", std::process::id()));
        for node in &self.nodes {
            let target = kept.join(&node.name);
            let copied = std::fs::create_dir_all(&target).is_ok()
                && Command::new("cp")
                    .arg("-r")
                    .arg(node.dir.join("log"))
                    .arg(&target)
                    .status()
                    .is_ok_and(|status| status.success());
            if !copied {
                eprintln!(
                    "could not copy the logs of {} to {}",
                    node.name,
                    target.display()
                );
            }
        }
        eprintln!(
            "RabbitMQ logs of the test cluster kept in {}",
            kept.display()
        );
    }
}

/// Runs `command` and kills it with every process it started when it runs longer than `timeout`.
/// `rabbitmqctl stop` was seen to wait for minutes, past its own --timeout, for the last node of a cluster.
fn run_bounded(mut command: Command, timeout: Duration) {
    let Ok(mut child) = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    else {
        return;
    };
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        // rabbitmqctl runs its Erlang VM under su in a session of its own, so killing its process group would
        // miss it: kill the descendants by parent id instead.
        for descendant in descendants(pid) {
            kill_process(descendant);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Every process below `root`, read from /proc.
fn descendants(root: i32) -> Vec<i32> {
    let parents: Vec<(i32, i32)> = std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(|entry| {
                    let pid: i32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
                    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                    // The command name in brackets may contain spaces; the parent id follows it.
                    let after_name = stat.rsplit_once(')')?.1;
                    let parent: i32 = after_name.split_whitespace().nth(1)?.parse().ok()?;
                    Some((pid, parent))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut found = vec![root];
    let mut index = 0;
    while index < found.len() {
        let parent = found[index];
        found.extend(
            parents
                .iter()
                .filter(|(_, of)| *of == parent)
                .map(|(pid, _)| *pid),
        );
        index += 1;
    }
    found.remove(0);
    found
}

/// The rabbitmq user's ids and home directory.
struct RabbitUser {
    uid: libc::uid_t,
    gid: libc::gid_t,
    home: PathBuf,
}

impl RabbitUser {
    fn look_up() -> RabbitUser {
        let name = std::ffi::CString::new("rabbitmq").expect("no NUL in the user name");
        // SAFETY: getpwnam gets a NUL-terminated name; the returned record is read before any other call that
        // could overwrite it.
        let record = unsafe { libc::getpwnam(name.as_ptr()) };
        assert!(!record.is_null(), "the rabbitmq user does not exist");
        // SAFETY: checked non-null above; pw_dir is a NUL-terminated string in the same record.
        let (uid, gid, home) = unsafe {
            let record = &*record;
            let home = std::ffi::CStr::from_ptr(record.pw_dir)
                .to_string_lossy()
                .into_owned();
            (record.pw_uid, record.pw_gid, PathBuf::from(home))
        };
        RabbitUser { uid, gid, home }
    }

    /// A command that runs `program` as this user, with the open-file limit raised to [`NODE_OPEN_FILES`]. It
    /// switches user itself rather than through su, which would reset the limit.
    fn command(&self, program: &std::path::Path) -> Command {
        use std::os::unix::process::CommandExt;
        let mut command = Command::new(program);
        command
            .current_dir(&self.home)
            .env("HOME", &self.home)
            .env("USER", "rabbitmq")
            .env("LOGNAME", "rabbitmq");
        let (uid, gid) = (self.uid, self.gid);
        // SAFETY: the closure runs between fork and exec and only makes system calls (getrlimit, setrlimit,
        // setgroups, setgid, setuid), which are async-signal-safe; it allocates nothing.
        unsafe {
            command.pre_exec(move || {
                let mut limit = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                limit.rlim_cur = NODE_OPEN_FILES.min(limit.rlim_max);
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0
                    || libc::setgroups(1, &gid) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        command
    }
}

/// The `rabbitmq-server` script that starts the node itself: Debian's /usr/sbin one only switches to the
/// rabbitmq user and runs the one in /usr/lib/rabbitmq/bin.
fn server_script() -> PathBuf {
    let packaged = PathBuf::from("/usr/lib/rabbitmq/bin/rabbitmq-server");
    if packaged.is_file() {
        return packaged;
    }
    find_program("rabbitmq-server").expect("rabbitmq-server is installed")
}

/// The soft open-file limit of a running process, from /proc.
fn open_file_limit(pid: i32) -> Option<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

fn prepare_node_dir(node: &RabbitNode) {
    for sub in ["mnesia", "log"] {
        std::fs::create_dir_all(node.dir.join(sub)).expect("create a node directory");
    }
    // A config file of its own, so the machine's /etc/rabbitmq/rabbitmq.conf (which may name port 5672) does not
    // apply to this node.
    std::fs::write(
        node.dir.join("rabbitmq.conf"),
        format!("listeners.tcp.local = 127.0.0.1:{}\n", node.amqp_port),
    )
    .expect("write the node's rabbitmq.conf");
    std::fs::write(node.dir.join("plugins"), "[].\n").expect("write the node's plugins file");
}

/// Stops a node of this name left running by an earlier run that was killed before its cleanup ran.
fn stop_leftover(name: &str) {
    let names = Command::new("epmd").arg("-names").output();
    let short = name.split('@').next().unwrap_or(name);
    let registered = names.is_ok_and(|output| {
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .any(|line| line.split_whitespace().nth(1) == Some(short))
    });
    if registered {
        eprintln!("stopping RabbitMQ node {name}, left running by an earlier test run");
        let mut command = Command::new("rabbitmqctl");
        command.args(["-n", name, "stop"]);
        run_bounded(command, STOP_TIMEOUT);
    }
}

fn assert_port_free(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "port {port} on 127.0.0.1 is in use; the test cluster needs ports 5681-5683 and 25681-25683"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn run_checked(command: &mut Command, what: &str) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("could not {what}: {error}"));
    assert!(
        output.status.success(),
        "could not {what}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// True while `pid` runs; a zombie (exited, not yet reaped by its parent) does not count.
fn process_exists(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z")
    })
}

/// Sends SIGKILL to `pid` and waits up to 10 s until the process is gone.
pub fn kill_process(pid: i32) {
    // SAFETY: kill with a positive pid and a valid signal has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while process_exists(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

//! A kvd cluster of real `kvd` processes, on ports picked by binding port 0
//! and temporary data directories; every process is killed when the cluster
//! is dropped.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kvd::client::Client;

use kvd_testkit::{agreed_leader, free_ports, Cluster};

use super::WAIT;

/// Members as child processes of the test.
pub struct ProcessCluster {
    children: Vec<Option<Child>>,
    args: Vec<Vec<String>>,
    client_ports: Vec<u16>,
    dir: tempfile::TempDir,
}

impl ProcessCluster {
    /// Starts `n` members of the `kvd` binary of this build and waits for a
    /// leader.
    pub async fn start(n: usize) -> ProcessCluster {
        Self::start_with(n, &[]).await
    }

    /// Starts `n` members given `extra` flags as well.
    pub async fn start_with(n: usize, extra: &[&str]) -> ProcessCluster {
        let ports = free_ports(2 * n);
        let (client_ports, peer_ports) = ports.split_at(n);
        let initial: Vec<String> =
            peer_ports.iter().enumerate().map(|(i, p)| format!("m{i}=http://127.0.0.1:{p}")).collect();
        let dir = tempfile::tempdir().expect("tempdir");
        let args: Vec<Vec<String>> = (0..n)
            .map(|i| {
                let client = format!("http://127.0.0.1:{}", client_ports[i]);
                let peer = format!("http://127.0.0.1:{}", peer_ports[i]);
                let data = dir.path().join(format!("m{i}")).display().to_string();
                [
                    "--name",
                    &format!("m{i}"),
                    "--data-dir",
                    &data,
                    "--listen-client-urls",
                    &client,
                    "--advertise-client-urls",
                    &client,
                    "--listen-peer-urls",
                    &peer,
                    "--initial-advertise-peer-urls",
                    &peer,
                    "--initial-cluster",
                    &initial.join(","),
                    "--heartbeat-interval",
                    "50",
                    "--election-timeout",
                    "500",
                    "--worker-threads",
                    "1",
                ]
                .iter()
                .chain(extra)
                .map(|s| s.to_string())
                .collect()
            })
            .collect();
        let mut c =
            ProcessCluster { children: (0..n).map(|_| None).collect(), args, client_ports: client_ports.to_vec(), dir };
        for i in 0..n {
            c.spawn(i);
        }
        c.leader().await;
        c
    }

    fn spawn(&mut self, i: usize) {
        let log = File::options().create(true).append(true).open(self.log(i)).expect("member log");
        let child = Command::new(env!("CARGO_BIN_EXE_kvd"))
            .args(&self.args[i])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start kvd");
        self.children[i] = Some(child);
    }

    /// The value of the gauge or counter `name` in member `i`'s `/metrics`,
    /// if it answers and has it.
    pub async fn metric(&self, i: usize, name: &str) -> Option<f64> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.client_ports[i]));
        let (_, metrics) = super::http_get(addr, "/metrics").await.ok()?;
        super::metric_value(&metrics, name)
    }

    /// Member `i`'s process id, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.children[i].as_ref().map(Child::id)
    }

    /// Member `i`'s data directory.
    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("m{i}"))
    }

    /// Member `i`'s log file.
    pub fn log(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("m{i}.log"))
    }
}

impl Cluster for ProcessCluster {
    fn size(&self) -> usize {
        self.children.len()
    }

    fn running(&self) -> Vec<usize> {
        (0..self.children.len()).filter(|i| self.children[*i].is_some()).collect()
    }

    fn client(&self, i: usize) -> Client {
        Client::new(&[format!("http://127.0.0.1:{}", self.client_ports[i])], Duration::from_secs(2)).expect("client")
    }

    fn client_all(&self) -> Client {
        let eps: Vec<String> = self.client_ports.iter().map(|p| format!("http://127.0.0.1:{p}")).collect();
        Client::new(&eps, Duration::from_secs(2)).expect("client")
    }

    async fn leader(&self) -> usize {
        agreed_leader(&self.running(), |i| async move { self.client(i).status_of(0).await.ok() }, WAIT).await
    }

    async fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn restart(&mut self, i: usize) {
        assert!(self.children[i].is_none(), "member {i} is running");
        self.spawn(i);
        // Up once it answers on its client port.
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.client(i).status_of(0).await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "member {i} did not come back");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ProcessCluster {
    fn drop(&mut self) {
        for child in self.children.iter_mut().filter_map(Option::take) {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

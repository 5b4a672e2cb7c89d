//! A privately started (not shared) minimal control plane works and its Drop stops every
//! component and removes its files.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use wtc_k8s_harness::{ControlPlane, Options};

#[test]
fn minimal_control_plane_starts_and_drop_tears_it_down() {
    let cp = ControlPlane::start(Options::minimal()).expect("start etcd + kube-apiserver");
    let port: u16 = cp.server_url().rsplit(':').next().unwrap().parse().unwrap();
    let kubeconfig = cp.kubeconfig_path().to_path_buf();
    assert!(kubeconfig.is_file());

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let version = rt.block_on(async { cp.client().apiserver_version().await.expect("version") });
    assert_eq!(version.minor, "36");

    drop(cp);
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "kube-apiserver still listening after Drop"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!kubeconfig.exists(), "temp dir not removed");
}

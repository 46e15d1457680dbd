//! The store conformance suite, run against every backend: memory, dir (a temporary directory),
//! and s3 over HTTP against a real S3 server (moto started on loopback, or the endpoint named by
//! CAIRN_TEST_S3_ENDPOINT and CAIRN_TEST_S3_BUCKET).

use std::sync::Arc;

use cairn_fs::store::conformance::Fixture;
use cairn_fs::store::{StoreSpec, open_store};
use cairn_testkit::S3Server;

mod memory {
    use super::*;
    use cairn_fs::store::memory::MemoryStore;

    async fn fixture() -> Fixture {
        Fixture::new(Arc::new(MemoryStore::new()))
    }

    cairn_fs::store_conformance_tests!(fixture);
}

mod dir {
    use super::*;
    use cairn_fs::store::dir::DirStore;

    async fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = DirStore::open(dir.path()).expect("open the dir store");
        Fixture::keeping(Arc::new(store), dir)
    }

    cairn_fs::store_conformance_tests!(fixture);
}

mod s3 {
    use super::*;

    async fn fixture() -> Fixture {
        let server = S3Server::shared();
        let spec: StoreSpec = server
            .spec(&S3Server::unique_prefix("conformance"))
            .parse()
            .expect("a valid spec");
        Fixture::new(open_store(&spec).await.expect("open the s3 store"))
    }

    cairn_fs::store_conformance_tests!(fixture);
}

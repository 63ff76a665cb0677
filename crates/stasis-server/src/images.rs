//! The default guest image, built on first use (in the background at start-up) and cached.

use std::path::PathBuf;
use std::sync::Arc;

use stasis_image::{Image, ImageSpec};

pub struct Images {
    cache_dir: PathBuf,
    spec: ImageSpec,
    ready: tokio::sync::Mutex<Option<Image>>,
}

impl Images {
    pub fn new(cache_dir: PathBuf) -> Arc<Images> {
        Arc::new(Images {
            cache_dir,
            spec: ImageSpec::default(),
            ready: tokio::sync::Mutex::new(None),
        })
    }

    /// The image, building it if this process has not yet (one build at a time; callers wait).
    pub async fn get(&self) -> crate::error::Result<Image> {
        use crate::error::Error;
        let mut ready = self.ready.lock().await;
        if let Some(image) = ready.as_ref() {
            return Ok(image.clone());
        }
        let cache = self.cache_dir.clone();
        let spec = self.spec.clone();
        let built = tokio::task::spawn_blocking(move || {
            let progress = |m: &str| tracing::info!("image: {m}");
            stasis_image::ensure(&cache, &spec, &progress)
        })
        .await
        .map_err(Error::internal)?
        .map_err(|e| Error::Unavailable(format!("building the guest image: {e}")))?;
        tracing::info!(id = %built.id, kernel = %built.kernel_release, "guest image ready");
        *ready = Some(built.clone());
        Ok(built)
    }

    /// An image built earlier and still in the cache, by its id (the image a snapshot from
    /// before machine descriptions was taken on). None if it is not there or `id` is not an
    /// image id.
    pub async fn by_id(&self, id: &str) -> Option<Image> {
        if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let meta = self.cache_dir.join("images").join(id).join("image.json");
        let bytes = tokio::fs::read(&meta).await.ok()?;
        serde_json::from_slice::<Image>(&bytes)
            .ok()
            .filter(|image| image.id == id)
    }
}

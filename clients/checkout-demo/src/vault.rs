//! The two vault calls the merchant backend makes, GetSealingKey and TokenizeSealed,
//! through the client library as the merchant's `tokenize` identity.

use vault_client::{ClientConfig, VaultClient};

/// The sealing key as the page gets it (nothing in it is secret).
pub use vault_client::SealingKey;

/// What the page may learn of a stored card.
#[derive(Debug, Clone)]
pub struct Stored {
    pub token: String,
    pub brand: String,
    pub last_four: String,
}

/// The vault, connected at the first call (the dev stack may come up after us) and
/// kept: the channel reconnects by itself.
#[derive(Debug)]
pub struct Vault {
    config: ClientConfig,
    client: tokio::sync::Mutex<Option<VaultClient>>,
}

impl Vault {
    pub fn new(config: ClientConfig) -> Self {
        Self {
            config,
            client: tokio::sync::Mutex::new(None),
        }
    }

    async fn client(&self) -> Result<VaultClient, vault_client::Error> {
        let mut slot = self.client.lock().await;
        if let Some(client) = slot.as_ref() {
            return Ok(client.clone());
        }
        let client = VaultClient::connect(&self.config).await?;
        *slot = Some(client.clone());
        Ok(client)
    }

    pub async fn sealing_key(&self) -> Result<SealingKey, vault_client::Error> {
        self.client().await?.sealing_key().await
    }

    /// The vault answers the same sealed card sent again within its window with the
    /// first token, so the client library retries this on transport failures.
    pub async fn tokenize_sealed(&self, sealed_card: &[u8]) -> Result<Stored, vault_client::Error> {
        let info = self
            .client()
            .await?
            .tokenize_sealed(sealed_card, false)
            .await?;
        Ok(Stored {
            token: info.token,
            brand: info.brand,
            last_four: info.last_four,
        })
    }
}

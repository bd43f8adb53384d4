//! The wire contract of the vault and the key service: generated prost messages and
//! tonic stubs, nothing else.
//!
//! Must never depend on crypto, storage or server crates. Wire types stop at the gRPC
//! handlers: servers convert them to validated domain types (STYLE.md rule 3).

#![allow(missing_debug_implementations)] // generated tonic clients and servers

use std::fmt;

pub mod codec;

pub mod vault {
    pub mod v1 {
        tonic::include_proto!("tokenvault.vault.v1");

        /// The encoded `FileDescriptorSet` of vault.proto, for server reflection.
        pub const FILE_DESCRIPTOR_SET: &[u8] =
            include_bytes!(concat!(env!("OUT_DIR"), "/vault_descriptor.bin"));
    }
}

pub mod keys {
    pub mod v1 {
        tonic::include_proto!("tokenvault.keys.v1");

        /// The encoded `FileDescriptorSet` of keys.proto, for server reflection.
        pub const FILE_DESCRIPTOR_SET: &[u8] =
            include_bytes!(concat!(env!("OUT_DIR"), "/keys_descriptor.bin"));
    }
}

impl fmt::Debug for vault::v1::Card {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Card")
            .field("number", &"[REDACTED]")
            .field("exp_month", &self.exp_month)
            .field("exp_year", &self.exp_year)
            .field("cardholder_name", &"[REDACTED]")
            .field("cvc", &"[REDACTED]")
            .finish()
    }
}

/// Header values may carry the caller's processor credentials, or (in a processor's
/// answer) masked card data: only the name is printed.
impl fmt::Debug for vault::v1::Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Header")
            .field("name", &self.name)
            .field("value", &"[REDACTED]")
            .finish()
    }
}

impl fmt::Debug for keys::v1::KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyMaterial")
            .field("purpose", &self.purpose)
            .field("version", &self.version)
            .field("state", &self.state)
            .field("material", &"[REDACTED]")
            .finish()
    }
}

/// Key material is wiped when the message goes away: the keyservice builds these to
/// send, and the vault decodes them; neither keeps a plain copy behind.
impl Drop for keys::v1::KeyMaterial {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.material);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn card_debug_hides_number_and_name() {
        let card = vault::v1::Card {
            number: "4242424242424242".into(),
            exp_month: 12,
            exp_year: 2030,
            cardholder_name: "Ada Lovelace".into(),
            cvc: "737".into(),
        };
        let request = vault::v1::TokenizeRequest {
            card: Some(card.clone()),
            reuse_existing: false,
            ttl_secs: 0,
            format: 0,
        };
        let subject = vault::v1::SubjectRequest { card: Some(card) };
        let request = format!("{request:?} {subject:?}");
        let printed = format!("{request} {request:#?}");
        assert!(!printed.contains("4242"), "{printed}");
        assert!(!printed.contains("Ada"), "{printed}");
        assert!(!printed.contains("737"), "{printed}");
        assert!(printed.contains("[REDACTED]"));
    }

    #[test]
    fn key_material_debug_hides_bytes() {
        let key = keys::v1::KeyMaterial {
            purpose: keys::v1::KeyPurpose::CardData as i32,
            version: 1,
            state: keys::v1::KeyState::Active as i32,
            material: vec![0xAB; 32],
            deactivated_at_unix_ms: 0,
        };
        let response = keys::v1::GetKeysResponse {
            keys: vec![key],
            generation: 7,
        };
        let printed = format!("{response:?}");
        assert!(!printed.contains("171"), "{printed}"); // 0xAB as a decimal byte
        assert!(printed.contains("[REDACTED]"));
    }
}

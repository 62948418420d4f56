//! Text <-> token ids: a Hugging Face `tokenizer.json` through the `tokenizers` crate, or
//! for the built-in random models a byte tokenizer (id = byte + 2, after `<s>`, `</s>`).

use crate::error::{Error, Result};
use std::path::Path;

pub enum Tokenizer {
    Hf(Box<tokenizers::Tokenizer>),
    Bytes,
    /// A checkpoint without tokenizer.json: ids only.
    None,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let t = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Tokenizer::Hf(Box::new(t)))
    }

    /// Encodes without adding special tokens (the oracle's prompts have no BOS).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Hf(t) => t
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| Error::Tokenizer(e.to_string())),
            Tokenizer::Bytes => Ok(text.bytes().map(|b| b as u32 + 2).collect()),
            Tokenizer::None => Err(Error::Tokenizer(
                "this model has no tokenizer.json: give prompts as ids".into(),
            )),
        }
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Tokenizer::Hf(t) => t.decode(ids, true).unwrap_or_default(),
            Tokenizer::Bytes => {
                let bytes: Vec<u8> = ids
                    .iter()
                    .filter(|&&i| (2..258).contains(&i))
                    .map(|&i| (i - 2) as u8)
                    .collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
            Tokenizer::None => String::new(),
        }
    }
}

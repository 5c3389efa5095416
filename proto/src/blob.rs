//! Blobs on the wire: images a recipe refers to by sha256 (init images,
//! masks), sent once per job. Their checks live with the job spec in
//! `kiln_domain::spec`; the hashing and image rules are re-exported here for
//! the coordinator's result store.

pub use kiln_domain::image::{MAX_BLOB_BYTES, MAX_IMAGE_SIDE, check_image, sha256_hex};

//! Seed data: the question templates (`seed-templates`, from `config/templates.toml`) and the
//! demo's practice sessions (`seed-demo`).

mod corpus;
pub mod sessions;
pub mod templates;

pub use sessions::{DEMO_USERS, demo_sessions, seed_demo_sessions};
pub use templates::{Placeholder, TemplateSeed, read_templates, seed_templates};

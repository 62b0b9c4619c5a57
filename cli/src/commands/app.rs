//! `drover app apply|list|show`: app specs, how each app is deployed.

use std::path::PathBuf;

use clap::Subcommand;
use drover_proto::v1;
use serde_json::{Value, json};

use super::{Ctx, read_file};
use crate::CliError;
use crate::output;
use crate::render::{List, Render, line};

#[derive(Debug, Subcommand)]
pub enum AppCommand {
    /// Validate an app spec (TOML) and store it as the app's new revision.
    Apply { file: PathBuf },
    /// List applied apps.
    List,
    /// Print an app's current spec.
    Show { name: String },
}

/// What `drover app apply` stored.
struct Applied(v1::ApplyAppResponse);

impl Render for Applied {
    fn text(&self, _now_ms: i64) -> String {
        let r = &self.0;
        if r.changed {
            line(format!("app {} applied: revision {}", r.name, r.revision))
        } else {
            line(format!(
                "app {} unchanged (revision {})",
                r.name, r.revision
            ))
        }
    }
    fn json(&self) -> Value {
        json!({"name": self.0.name, "revision": self.0.revision, "changed": self.0.changed})
    }
}

/// `drover app show`: a comment header (revision, who applied it, what it is allowed) and the
/// spec as applied.
struct Shown(v1::AppInfo);

impl Render for Shown {
    fn text(&self, now_ms: i64) -> String {
        let app = &self.0;
        let mut out = line(format!(
            "# app {} revision {}, applied {} by {}",
            app.name,
            app.revision,
            output::ago(app.updated_unix_ms, now_ms),
            app.updated_by
        ));
        let privileges = output::app_privileges(app);
        if !privileges.is_empty() {
            out.push_str(&line(format!(
                "# allowed beyond a plain container: {}",
                privileges.join("; ")
            )));
        }
        out.push_str(&app.spec_toml);
        out
    }
    fn json(&self) -> Value {
        output::app_json(&self.0)
    }
}

pub async fn run(ctx: &mut Ctx, command: AppCommand) -> Result<(), CliError> {
    match command {
        AppCommand::Apply { file } => {
            let spec_toml = read_file(&file)?;
            let resp = ctx
                .api
                .apply_app(v1::ApplyAppRequest {
                    spec_toml,
                    source: file.display().to_string(),
                })
                .await
                .map_err(ctx.err())?
                .into_inner();
            ctx.show(&Applied(resp))
        }
        AppCommand::List => {
            let apps = ctx
                .api
                .list_apps(v1::ListAppsRequest {})
                .await
                .map_err(ctx.err())?
                .into_inner()
                .apps;
            ctx.show(&List {
                items: &apps,
                json: output::app_json,
                table: output::apps_table,
            })
        }
        AppCommand::Show { name } => {
            let app = ctx
                .api
                .get_app(v1::GetAppRequest { name })
                .await
                .map_err(ctx.err())?
                .into_inner();
            ctx.show(&Shown(app))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_is_a_header_and_the_spec_as_applied() {
        let app = v1::AppInfo {
            name: "api".into(),
            revision: 3,
            updated_by: "alice".into(),
            spec_toml: "name = \"api\"\n".into(),
            ..Default::default()
        };
        assert_eq!(
            Shown(app).text(0),
            "# app api revision 3, applied never by alice\nname = \"api\"\n"
        );
    }

    #[test]
    fn apply_says_whether_it_changed_anything() {
        let mut r = v1::ApplyAppResponse {
            name: "api".into(),
            revision: 2,
            changed: true,
        };
        assert_eq!(Applied(r.clone()).text(0), "app api applied: revision 2\n");
        r.changed = false;
        assert_eq!(Applied(r).text(0), "app api unchanged (revision 2)\n");
    }
}

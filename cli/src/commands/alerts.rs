//! `drover alerts [--all]`: open (and with `--all` resolved) alerts.

use drover_proto::v1;

use super::Ctx;
use crate::render::List;
use crate::{CliError, output};

pub async fn list(ctx: &mut Ctx, all: bool) -> Result<(), CliError> {
    let alerts = ctx
        .api
        .list_alerts(v1::ListAlertsRequest { all })
        .await
        .map_err(ctx.err())?
        .into_inner()
        .alerts;
    ctx.show(&List {
        items: &alerts,
        json: output::alert_json,
        table: output::alerts_table,
    })
}

//! The CONNECT handshake: the first packet read within the connect
//! timeout and checked, the login, the session claimed, CONNACK queued.
//!
//! It runs in a boxed future freed when it ends (see `serve.rs`), so its
//! state does not stay in the task of a connection for its whole life.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use super::client::{kind, Client, Identity, Terms};
use super::serve::{close, Origin};
use super::stats::BrokerStats;
use super::{Broker, ClaimRefused};
use crate::access::{login, Refusal};
use crate::connection::{Inbox, Outbox};
use crate::packet::*;
use crate::TopicName;

/// Reads and checks CONNECT, claims the session and queues CONNACK: the
/// stream, the client and what was read after CONNECT; `None` when the
/// connection is refused or gone.
pub(super) async fn handshake<S>(mut stream: S, broker: Broker, origin: Origin) -> Option<(S, Client, Inbox)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let peer = origin.peer.as_str();
    let mut inbox = Inbox::new();
    let settings = broker.settings();
    let read = poll_fn(|cx| inbox.poll_packet(Pin::new(&mut stream), cx, settings.max_packet_size, None));
    let deadline = origin.deadline.unwrap_or_else(|| tokio::time::Instant::now() + settings.connect_timeout);
    let first = tokio::time::timeout_at(deadline, read).await;
    let mut connect = match first {
        Err(_) => {
            tracing::info!(%peer, "no CONNECT within {}s; closing", settings.connect_timeout.as_secs());
            return None;
        }
        Ok(Ok(Some(Packet::Connect(connect)))) => connect,
        Ok(Ok(None)) => return None,
        Ok(Ok(Some(other))) => {
            // MQTT-3.1.0-1: the first packet must be CONNECT.
            tracing::info!(%peer, packet = ?kind(&other), "first packet is not CONNECT; closing");
            return None;
        }
        Ok(Err(e)) => {
            if e.reason() == Some(ReasonCode::UNSUPPORTED_PROTOCOL_VERSION) {
                // MQTT-3.1.2-2: CONNACK 0x01 (3.1.1's code), then close.
                let mut outbox = Outbox::default();
                outbox.queue(&connack(false, ReasonCode(0x01), Properties::default()), Protocol::V311);
                close(&mut stream, &mut outbox).await;
            }
            tracing::info!(%peer, error = %e, "bad CONNECT; closing");
            return None;
        }
    };
    BrokerStats::add(&broker.shared.stats.bytes_received, u64::from(inbox.take_consumed()));
    let version = connect.protocol;
    let v5 = version == Protocol::V5;
    let refuse = |code: ReasonCode, v311_code: u8, client: &str, why: &str| {
        tracing::info!(%peer, %client, %code, "connection refused: {why}");
        let mut outbox = Outbox::default();
        outbox.queue(
            &connack(false, if v5 { code } else { ReasonCode(v311_code) }, Properties::default()),
            version,
        );
        outbox
    };
    let mut assigned = None;
    if connect.client_id.is_empty() {
        if !v5 && !connect.clean_start {
            // MQTT-3.1.3-8: a zero-length id needs a clean session in 3.1.1.
            let why = "empty client id without clean session";
            let mut outbox = refuse(ReasonCode::CLIENT_IDENTIFIER_NOT_VALID, 0x02, "", why);
            close(&mut stream, &mut outbox).await;
            return None;
        }
        let id = format!("fieldmq-{:016x}", crate::random::random_u64());
        connect.client_id.clone_from(&id);
        assigned = Some(id);
    }
    // Read before the rules the login uses: a reload in between is caught.
    let login_epoch = broker.access_epoch();
    let access = broker.access();
    let checked = login(
        access.clone(),
        &broker.shared.guard,
        deadline,
        origin.ip,
        origin.certificate_user.clone(),
        connect.username.as_deref(),
        connect.password.as_deref(),
    );
    // Waiting for a password check counts against the connect timeout too.
    let user = match checked.await {
        Ok(user) => user,
        Err(refusal) => {
            // The same answer for an unknown user and a wrong password.
            let (code, why) = match refusal {
                Refusal::BadCredentials => {
                    (ReasonCode::BAD_USER_NAME_OR_PASSWORD, "bad user name or password")
                }
                Refusal::AnonymousNotAllowed => {
                    (ReasonCode::NOT_AUTHORIZED, "anonymous clients are not allowed")
                }
                Refusal::Busy => (ReasonCode::SERVER_BUSY, "the password check waited past connect_timeout"),
            };
            // 3.1.1's 0x05 (not authorized) for both, as mosquitto answers;
            // 0x03 (server unavailable) when it was only busy.
            let v311 = if refusal == Refusal::Busy { 0x03 } else { 0x05 };
            let why = match &connect.username {
                Some(user) => format!("{why} (user `{user}`)"),
                None => why.to_owned(),
            };
            let mut outbox = refuse(code, v311, &connect.client_id, &why);
            close(&mut stream, &mut outbox).await;
            return None;
        }
    };
    if let Some(will) = &connect.will {
        if TopicName::new(will.topic.as_str()).is_err() {
            let mut outbox =
                refuse(ReasonCode::TOPIC_NAME_INVALID, 0x02, &connect.client_id, "invalid will topic");
            close(&mut stream, &mut outbox).await;
            return None;
        }
        // A will is a publish like any other: the ACL must allow it.
        if !access.may_write(user.as_deref(), &connect.client_id, &will.topic) {
            let why = "the ACL does not allow the will's topic";
            let mut outbox = refuse(ReasonCode::NOT_AUTHORIZED, 0x05, &connect.client_id, why);
            close(&mut stream, &mut outbox).await;
            return None;
        }
    }
    drop(access);
    let terms = terms(&broker, &mut connect);
    let client_id: Arc<str> = connect.client_id.as_str().into();
    let claim = broker.claim(client_id, connect.clean_start, terms.session_expiry, user.clone(), login_epoch);
    let (claim, session_present) = match claim.await {
        Ok(claimed) => claimed,
        Err(refused) => {
            let (code, v311, why) = match refused {
                ClaimRefused::OtherUser => (
                    ReasonCode::NOT_AUTHORIZED,
                    0x05,
                    "the client id's session belongs to another user's connection",
                ),
                ClaimRefused::Reloaded => (
                    ReasonCode::SERVER_BUSY,
                    0x03,
                    "the password and ACL files were reloaded during the login; try again",
                ),
                // Taken over before it was connected: CONNACK has no code
                // for that, so it is accepted and at once taken over (0x8E
                // in MQTT 5), as if the newer connection came a moment later.
                ClaimRefused::Superseded => {
                    let mut outbox = Outbox::default();
                    outbox.queue(&connack(false, ReasonCode::SUCCESS, Properties::default()), version);
                    if v5 {
                        outbox.queue(
                            &Packet::Disconnect(Disconnect::new(ReasonCode::SESSION_TAKEN_OVER)),
                            version,
                        );
                    }
                    close(&mut stream, &mut outbox).await;
                    return None;
                }
            };
            let mut outbox = refuse(code, v311, &connect.client_id, why);
            close(&mut stream, &mut outbox).await;
            return None;
        }
    };
    let settings = broker.settings();
    let properties = if v5 {
        Properties {
            receive_maximum: Some(settings.receive_maximum),
            topic_alias_maximum: Some(settings.topic_alias_maximum),
            maximum_packet_size: Some(settings.max_packet_size as u32),
            assigned_client_identifier: assigned,
            server_keep_alive: (terms.keep_alive != connect.keep_alive).then_some(terms.keep_alive),
            retain_available: Some(1),
            wildcard_subscription_available: Some(1),
            subscription_identifier_available: Some(1),
            shared_subscription_available: Some(1),
            ..Properties::default()
        }
    } else {
        Properties::default()
    };
    let identity = Identity { peer: peer.into(), user };
    let mut client = Client::new(broker, claim, terms, identity);
    client.broker.shared.stats.client_connected();
    client.queue(&connack(session_present, ReasonCode::SUCCESS, properties));
    tracing::debug!(peer = %client.identity.peer, client = %client.client_id(), v5, session_present, "client connected");
    client.resend_inflight();
    if client.terms.keep_alive != 0 {
        client.broker.watch_keepalive(&client.claim, client.grace());
    }
    Some((stream, client, inbox))
}

/// The limits CONNECT settles; takes the will out of it.
fn terms(broker: &Broker, connect: &mut Connect) -> Terms {
    let v5 = connect.protocol == Protocol::V5;
    let settings = broker.settings();
    let p = &connect.properties;
    // A 5.0 client's Receive Maximum is its limit, ours is max_inflight:
    // in-flight messages have left the bounded mailbox, so they need one.
    let send_quota = if v5 {
        p.receive_maximum.unwrap_or(u16::MAX).min(settings.max_inflight)
    } else {
        settings.max_inflight
    };
    // 3.1.1: a clean session ends with the connection; otherwise it
    // never expires. 5.0: as the client says (absent = 0).
    let session_expiry = if v5 {
        p.session_expiry_interval.unwrap_or(0)
    } else if connect.clean_start {
        0
    } else {
        u32::MAX
    };
    let mut keep_alive = connect.keep_alive;
    if settings.max_keep_alive > 0 && (keep_alive == 0 || keep_alive > settings.max_keep_alive) {
        keep_alive = settings.max_keep_alive;
    }
    Terms {
        version: connect.protocol,
        keep_alive,
        send_quota,
        outbound_alias_max: if v5 { p.topic_alias_maximum.unwrap_or(0) } else { 0 },
        client_max_packet: p.maximum_packet_size.unwrap_or(u32::MAX),
        session_expiry,
        will: connect.will.take().map(Box::new),
    }
}

fn connack(session_present: bool, code: ReasonCode, properties: Properties) -> Packet {
    Packet::Connack(Connack { session_present, code, properties })
}

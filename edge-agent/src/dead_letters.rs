//! `edge-agent dead-letters list|replay`: what an operator does with messages refused for good.
//!
//! A refusal (the cloud broker's ACL denies a topic, a message no frame can carry) is final for that one
//! message: the uplink files it in the dead-letter store ([`crate::DEAD_LETTERS_FILE`],
//! `shared::queue::DeadLetters`) and the messages behind it keep flowing. Once the cause is fixed, `replay`
//! publishes each letter again **to the site's own broker** (the embedded broker's port, or the external
//! broker), where it takes the normal path: routes, queue, uplink, with a new seq. A letter is removed only
//! after that broker acknowledged the replay, so a failed replay loses nothing. Replays publish at QoS 1 at
//! least, since only an acknowledged publish proves the message is back in the queue.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{PubAckReason, PubRecReason, PublishProperties};
use rumqttc::v5::mqttbytes::QoS as MqttQoS;
use rumqttc::v5::{AsyncClient, Event, Incoming, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use shared::config::{AgentConfig, BrokerConfig};
use shared::envelope::{Envelope, QoS};
use shared::queue::{DeadLetter, DeadLetterLimits, DeadLetters};

use crate::error::AgentError;

/// How long a command waits for the running agent to release the store.
const OPEN_WAIT: Duration = Duration::from_secs(10);
/// How long one replayed publish may wait for its acknowledgement.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// A letter as the listing shows it.
#[derive(Debug, Clone)]
pub struct Listed {
    /// The stored letter.
    pub letter: DeadLetter,
    /// Its message, if the body decodes.
    pub envelope: Option<Envelope>,
}

fn open(cfg: &AgentConfig) -> Result<DeadLetters, AgentError> {
    DeadLetters::open(
        cfg.data_dir.join(crate::DEAD_LETTERS_FILE),
        DeadLetterLimits::default(),
        OPEN_WAIT,
    )
    .map_err(AgentError::DeadLetters)
}

/// Whether anything was ever filed (the commands do not create the store, or the data directory).
fn exists(cfg: &AgentConfig) -> bool {
    cfg.data_dir.join(crate::DEAD_LETTERS_FILE).exists()
}

/// Every dead letter, oldest first.
///
/// # Errors
/// [`AgentError::DeadLetters`] if the store cannot be read.
pub fn list(cfg: &AgentConfig) -> Result<Vec<Listed>, AgentError> {
    if !exists(cfg) {
        return Ok(Vec::new());
    }
    let letters = open(cfg)?.list().map_err(AgentError::DeadLetters)?;
    Ok(letters
        .into_iter()
        .map(|letter| Listed {
            envelope: Envelope::decode_body(letter.letter.seq, letter.letter.body.clone()).ok(),
            letter,
        })
        .collect())
}

/// What a replay did.
#[derive(Debug, Default)]
pub struct Replayed {
    /// Ids published again and removed.
    pub replayed: Vec<u64>,
    /// Ids the broker refused again (kept), with the reason.
    pub refused: Vec<(u64, String)>,
}

/// Publishes the letters with these ids (all of them if `ids` is empty) to the site's broker and removes
/// each one the broker acknowledged.
///
/// # Errors
/// [`AgentError::DeadLetters`] for the store; [`AgentError::Replay`] if the broker cannot be reached or
/// stops answering (letters not yet acknowledged stay in the store).
pub async fn replay(cfg: &AgentConfig, ids: &[u64]) -> Result<Replayed, AgentError> {
    if !exists(cfg) {
        return Ok(Replayed::default());
    }
    let chosen: Vec<DeadLetter> = {
        let store = open(cfg)?;
        store
            .list()
            .map_err(AgentError::DeadLetters)?
            .into_iter()
            .filter(|l| ids.is_empty() || ids.contains(&l.id))
            .collect()
    };
    let mut out = Replayed::default();
    if chosen.is_empty() {
        return Ok(out);
    }
    let (client, mut eventloop) = AsyncClient::new(options(cfg)?, 16);
    for letter in chosen {
        let Ok(env) = Envelope::decode_body(letter.letter.seq, letter.letter.body.clone()) else {
            out.refused
                .push((letter.id, "the stored body does not decode".to_owned()));
            continue;
        };
        let qos = match env.qos {
            QoS::ExactlyOnce => MqttQoS::ExactlyOnce,
            QoS::AtMostOnce | QoS::AtLeastOnce => MqttQoS::AtLeastOnce,
        };
        client
            .publish_with_properties(
                env.topic.clone(),
                qos,
                env.retain,
                env.payload.clone(),
                properties(&env),
            )
            .await
            .map_err(|e| AgentError::Replay(e.to_string()))?;
        let verdict = tokio::time::timeout(ACK_TIMEOUT, async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Incoming::PubAck(ack))) => {
                        let ok = matches!(
                            ack.reason,
                            PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                        );
                        break Ok((ok, format!("PUBACK {:?}", ack.reason)));
                    }
                    Ok(Event::Incoming(Incoming::PubRec(rec))) => {
                        if !matches!(
                            rec.reason,
                            PubRecReason::Success | PubRecReason::NoMatchingSubscribers
                        ) {
                            break Ok((false, format!("PUBREC {:?}", rec.reason)));
                        }
                    }
                    Ok(Event::Incoming(Incoming::PubComp(_))) => break Ok((true, String::new())),
                    Ok(_) => {}
                    Err(e) => break Err(AgentError::Replay(e.to_string())),
                }
            }
        })
        .await
        .map_err(|_| AgentError::Replay(format!("no acknowledgement within {ACK_TIMEOUT:?}")))??;
        match verdict {
            (true, _) => {
                open(cfg)?
                    .remove(&[letter.id])
                    .map_err(AgentError::DeadLetters)?;
                out.replayed.push(letter.id);
            }
            (false, why) => out.refused.push((letter.id, why)),
        }
    }
    let _ = client.disconnect().await;
    Ok(out)
}

/// The MQTT 5 properties the message had, with its trace context as user properties.
fn properties(env: &Envelope) -> PublishProperties {
    let p = &env.properties;
    let mut user = p.user.clone();
    if let Some(trace) = &env.trace {
        user.push(("traceparent".to_owned(), trace.traceparent.clone()));
        if let Some(state) = &trace.tracestate {
            user.push(("tracestate".to_owned(), state.clone()));
        }
    }
    PublishProperties {
        payload_format_indicator: p.payload_format_utf8.then_some(1),
        message_expiry_interval: p.message_expiry,
        topic_alias: None,
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.clone(),
        user_properties: user,
        subscription_identifiers: Vec::new(),
        content_type: p.content_type.clone(),
    }
}

/// A clean-session client of the site's broker, as the agent's config describes it.
fn options(cfg: &AgentConfig) -> Result<MqttOptions, AgentError> {
    let client_id = format!("meshbridge-{}-replay", cfg.site);
    let mut options = match &cfg.broker {
        BrokerConfig::Embedded(b) => {
            let mut addr = b.listen;
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            let mut o = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
            if let (Some(user), Some(password)) = (&b.username, &b.password) {
                o.set_credentials(user.clone(), password.expose().to_owned());
            }
            o
        }
        BrokerConfig::External(b) => {
            let mut o = MqttOptions::new(client_id, b.address.host(), b.address.port());
            if let (Some(user), Some(password)) = (&b.username, &b.password) {
                o.set_credentials(user.clone(), password.expose().to_owned());
            }
            if let Some(t) = &b.tls {
                let client_auth = t.cert.as_deref().zip(t.key.as_deref());
                let config = meshbridge_tls::mqtt_client_config(&t.ca, client_auth)
                    .map_err(AgentError::BrokerTls)?;
                o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                    Arc::new(config),
                )));
            }
            o
        }
    };
    options
        .set_clean_start(true)
        .set_keep_alive(Duration::from_secs(30));
    Ok(options)
}

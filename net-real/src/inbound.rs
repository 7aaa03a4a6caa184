//! Inbound tunnel streams without loss.
//!
//! libp2p-stream hands inbound streams to `Control::accept` through a channel with room
//! for one and silently drops the next when its reader has not run yet — which on a
//! single-threaded runtime happens whenever one connection task negotiates two
//! streams in one poll (a burst of 64 concurrent opens lost streams on every try in
//! our test). This behaviour only *accepts* one protocol and pushes each negotiated
//! stream into an unbounded channel, so nothing is dropped. Outbound streams still
//! come from `libp2p_stream::Control::open_stream`.

use libp2p::core::transport::PortUse;
use libp2p::core::upgrade::{DeniedUpgrade, ReadyUpgrade};
use libp2p::core::Endpoint;
use libp2p::swarm::handler::{ConnectionEvent, FullyNegotiatedInbound};
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm, NetworkBehaviour,
    SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId, Stream, StreamProtocol};
use std::convert::Infallible;
use std::task::{Context, Poll};
use tokio::sync::mpsc;

/// Accepts `protocol` streams on every connection and sends them to `tx`.
pub struct AcceptStreams {
    protocol: StreamProtocol,
    tx: mpsc::UnboundedSender<(PeerId, Stream)>,
}

impl AcceptStreams {
    pub fn new(protocol: StreamProtocol) -> (Self, mpsc::UnboundedReceiver<(PeerId, Stream)>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (AcceptStreams { protocol, tx }, rx)
    }

    fn handler(&self, peer: PeerId) -> AcceptHandler {
        AcceptHandler { peer, protocol: self.protocol.clone(), tx: self.tx.clone() }
    }
}

impl NetworkBehaviour for AcceptStreams {
    type ConnectionHandler = AcceptHandler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer))
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer))
    }

    fn on_swarm_event(&mut self, _: FromSwarm) {}

    fn on_connection_handler_event(&mut self, _: PeerId, _: ConnectionId, event: THandlerOutEvent<Self>) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

pub struct AcceptHandler {
    peer: PeerId,
    protocol: StreamProtocol,
    tx: mpsc::UnboundedSender<(PeerId, Stream)>,
}

impl ConnectionHandler for AcceptHandler {
    type FromBehaviour = Infallible;
    type ToBehaviour = Infallible;
    type InboundProtocol = ReadyUpgrade<StreamProtocol>;
    type OutboundProtocol = DeniedUpgrade;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = Infallible;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol> {
        SubstreamProtocol::new(ReadyUpgrade::new(self.protocol.clone()), ())
    }

    fn poll(
        &mut self,
        _: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, Self::OutboundOpenInfo, Self::ToBehaviour>> {
        Poll::Pending
    }

    fn on_behaviour_event(&mut self, event: Infallible) {
        match event {}
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<Self::InboundProtocol, Self::OutboundProtocol, (), Infallible>,
    ) {
        if let ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound { protocol: stream, .. }) = event {
            let _ = self.tx.send((self.peer, stream));
        }
    }
}

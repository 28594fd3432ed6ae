//! Tether's WebSocket gateway.

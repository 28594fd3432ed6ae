//! Tenant backends (they hold API keys) and hostile upstreams.

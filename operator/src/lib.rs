//! The Tether operator (work in progress).

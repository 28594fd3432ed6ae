//! Property tests: the envelope decoder and the upgrade request parser never panic and
//! always answer with a documented error.

//! Loading a guest kernel and building what it reads at entry.

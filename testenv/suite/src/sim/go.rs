//! Go lockgate peers in the simulation (to come).

"""The simpy virtual patient: dynamics between events, pumps, sensors, disturbances, cohorts
and the real-time clock for hardware. Knows model/, not control/ nor transports."""

-- fence.lua: a write that changes nothing but propagates, so that the WAIT after it
-- covers everything this primary holds (on Redis 8.2 a connection's WAIT offset moves
-- only with its own propagated writes; 7.0.15 moved it with any command). Used after a
-- failover interrupted a delete's WAIT and the delete sent again to the new primary found
-- nothing left to delete.
-- KEYS[1]  '<prefix>:{<tag>}:f' (nothing else is ever stored there)
-- Reply:   1
redis.call('SET', KEYS[1], '1')
redis.call('DEL', KEYS[1])
return 1

-- rotate.lua: give a live session a new token in the same slot; the old token dies.
-- KEYS[1]  old session key
-- KEYS[2]  new session key (same tag, so same slot)
-- ARGV[1]  old session id     ARGV[2]  new session id
-- ARGV[3]  key base '<prefix>:{<tag>}:'
-- ARGV[4]  new owner (encoded user id), or '' to keep the owner. A user's tag is derived
--          from the user id, so a new owner in the same slot is the same user, or an
--          anonymous session whose random tag happens to equal that user's.
-- Reply:   0 if the old session is not live | record {value, pttl} of the new session
-- The new session keeps data, state, version, creation and absolute deadline; its idle
-- TTL starts again (rotation is activity).

local old = KEYS[1]
local v = redis.call('GET', old)
if not v then return 0 end
local now = now_ms()
local ttl = capped_ttl(v, now)
if ttl <= 0 then
  redis.call('DEL', old)
  return 0
end
local base = ARGV[3]
local owner, bar = owner_of(v)
if owner ~= '' then
  redis.call('ZREM', base .. INDEX_PART .. owner, ARGV[1])
end
if ARGV[4] ~= '' and ARGV[4] ~= owner then
  owner = ARGV[4]
  v = string.sub(v, 1, HEADER) .. owner .. string.sub(v, bar)
end
-- RENAME then SET, not SET + DEL: the keyspace notifications are then "rename_from" and
-- "rename_to", which SessionEngine.events() reports as one rotation (SET + DEL would read
-- as a creation and a revocation). The SET writes the new owner, if any, and restarts
-- the idle TTL.
redis.call('RENAME', old, KEYS[2])
redis.call('SET', KEYS[2], v, 'PX', ttl)
if owner ~= '' then
  local idx = base .. INDEX_PART .. owner
  redis.call('ZADD', idx, absolute_of(v), ARGV[2])
  index_expire(idx)
end
return {v, ttl}

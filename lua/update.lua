-- update.lua: change a live session's data and/or state, optionally compare-and-set.
-- KEYS[1]  session key
-- ARGV[1]  '1' if ARGV[2] holds new data, '0' to keep the data
-- ARGV[2]  data (JSON)
-- ARGV[3]  new state letter, or '' to keep it
-- ARGV[4]  expected version, or '-1' for no check
-- Reply:   0 not found | {'conflict', current version} | record {value, pttl}
-- Never creates a key (no resurrection), never changes the TTL (KEEPTTL).

local key = KEYS[1]
local v = redis.call('GET', key)
if not v then return 0 end
local version = version_of(v)
local expected = tonumber(ARGV[4])
if expected >= 0 and version ~= expected then
  return {'conflict', version}
end
local owner, bar = owner_of(v)
local data = string.sub(v, bar + 1)
if ARGV[1] == '1' then data = ARGV[2] end
local state = string.sub(v, F_STATE, T_STATE)
if ARGV[3] ~= '' then state = ARGV[3] end
v = pack_session(state, absolute_of(v), idle_of(v), created_of(v),
                 version + 1, owner, data)
redis.call('SET', key, v, 'KEEPTTL')
return {v, redis.call('PTTL', key)}

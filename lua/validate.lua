-- validate.lua: the hot path. Read a session, check its state, lazily refresh its TTL.
-- KEYS[1]  session key
-- ARGV[1]  allowed state letters, e.g. 'a' or 'ap' (layout: engine/_keys.py)
-- ARGV[2]  '1' to refresh the idle TTL (validate), '0' to only read (get)
-- ARGV[3]  refresh slack, a fraction of the session's own idle ttl: rewrite the TTL only
--          when it has fallen more than that below the TTL it would be given, so most
--          validations write nothing (a fraction, so sessions created with a shorter
--          idle ttl than the default are refreshed in time too)
-- Reply:   0 unknown | 1 expired | 2 state not allowed | {value, pttl_ms}
-- Never creates a key: a revoked or expired session stays dead (no resurrection).
-- No prelude: validations that write nothing cost one GET and one PTTL, no TIME.

local key = KEYS[1]
local v = redis.call('GET', key)
if not v then return 0 end
if not string.find(ARGV[1], string.sub(v, F_STATE, T_STATE), 1, true) then return 2 end
local pttl = redis.call('PTTL', key)
if pttl < 0 then
  -- A session without a TTL was tampered with (PERSIST): it is never valid.
  redis.call('DEL', key)
  return 1
end
if ARGV[2] == '1' then
  local want = tonumber(string.sub(v, F_IDLE, T_IDLE))
  local slack = tonumber(ARGV[3]) * want
  if want - pttl > slack then
    local t = redis.call('TIME')
    local left = tonumber(string.sub(v, F_ABSOLUTE, T_ABSOLUTE))
      - (tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
    if left <= 0 then
      redis.call('DEL', key)
      return 1
    end
    if left < want then want = left end
    if want - pttl > slack then
      redis.call('PEXPIRE', key, want)
      pttl = want
    end
  end
end
return {v, pttl}

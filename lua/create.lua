-- create.lua: store a new session and, for a user, index it and enforce the session limit.
-- KEYS[1]  session key
-- KEYS[2]  the user's session index (absent for an anonymous session)
-- ARGV[1]  session id          ARGV[2]  owner, encoded ('' anonymous)
-- ARGV[3]  state letter        ARGV[4]  data (JSON)
-- ARGV[5]  idle ttl, ms        ARGV[6]  absolute ttl, ms
-- ARGV[7]  max sessions per user
-- ARGV[8]  'evict' (drop the oldest session: the one closest to its absolute deadline)
--          or 'refuse'
-- ARGV[9]  key base '<prefix>:{<tag>}:' (the user's other session keys share the slot)
-- Reply:   record {value, pttl} | -1 when the limit is reached and the policy refuses
-- Everything that can fail is checked before the first delete (Lua does not roll back):
-- a create that fails must not have evicted a live session on the way. Never sent again
-- after a lost reply (a resend after a revoke_user would resurrect), so a key that exists
-- already is a collision of 128-bit ids, refused.

local key = KEYS[1]
if redis.call('EXISTS', key) == 1 then
  return redis.error_reply('ERR session id exists')
end
local now = now_ms()
local absolute = now + tonumber(ARGV[6])
local v = pack_session(ARGV[3], absolute, tonumber(ARGV[5]), now, 1, ARGV[2], ARGV[4])
local ttl = capped_ttl(v, now)
if not (ttl >= 1) then
  return redis.error_reply('ERR invalid ttl')
end

local idx = KEYS[2]
if idx then
  local base = ARGV[9]
  local limit = tonumber(ARGV[7])
  redis.call('ZREMRANGEBYSCORE', idx, '-inf', now)
  if redis.call('ZCARD', idx) >= limit then
    -- Members whose session idled out stay indexed until their absolute deadline.
    for _, sid in ipairs(redis.call('ZRANGE', idx, 0, -1)) do
      if redis.call('EXISTS', base .. SESSION_PART .. sid) == 0 then
        redis.call('ZREM', idx, sid)
      end
    end
  end
  while redis.call('ZCARD', idx) >= limit do
    if ARGV[8] ~= 'evict' then return -1 end
    local oldest = redis.call('ZPOPMIN', idx)
    redis.call('DEL', base .. SESSION_PART .. oldest[1])
  end
end

-- APPEND to the absent key, not SET: the keyspace notification is then "append", which
-- only create sends, so SessionEngine.events() tells a creation from an update ("set").
redis.call('APPEND', key, v)
redis.call('PEXPIRE', key, ttl)
if idx then
  -- Scores are absolute deadlines, kept strictly increasing per user (+1 ms on a tie) so
  -- that ZPOPMIN above evicts the oldest session, not the smallest id, when two sessions
  -- were created in the same millisecond.
  local score = absolute
  local top = redis.call('ZRANGE', idx, -1, -1, 'WITHSCORES')
  if top[2] and tonumber(top[2]) >= score then score = tonumber(top[2]) + 1 end
  redis.call('ZADD', idx, score, ARGV[1])
  index_expire(idx)
end
return {v, ttl}

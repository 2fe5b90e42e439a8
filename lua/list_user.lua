-- list_user.lua: a user's live sessions, pruning dead index entries on the way.
-- KEYS[1]  the user's session index
-- ARGV[1]  key base '<prefix>:{<tag>}:'
-- Reply:   flat list: for each live session: session id, value, pttl_ms

local idx = KEYS[1]
local base = ARGV[1]
redis.call('ZREMRANGEBYSCORE', idx, '-inf', now_ms())
local out = {}
for _, sid in ipairs(redis.call('ZRANGE', idx, 0, -1)) do
  local key = base .. SESSION_PART .. sid
  local v = redis.call('GET', key)
  if v then
    out[#out + 1] = sid
    out[#out + 1] = v
    out[#out + 1] = redis.call('PTTL', key)
  else
    redis.call('ZREM', idx, sid)
  end
end
return out

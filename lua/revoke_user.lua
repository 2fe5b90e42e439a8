-- revoke_user.lua: delete every session of a user (but one, optionally), atomically.
-- KEYS[1]  the user's session index
-- KEYS[2]  the user's chat-room set
-- ARGV[1]  key base '<prefix>:{<tag>}:'
-- ARGV[2]  session id to keep, or ''
-- ARGV[3]  '1' to delete the user's chat histories too
-- ARGV[4]  user id, encoded
-- Reply:   number of live sessions deleted
-- Every key touched shares KEYS[1]'s hash slot (same tag), so this is one atomic step.

local idx = KEYS[1]
local base = ARGV[1]
local keep = ARGV[2]
local n = 0
for _, sid in ipairs(redis.call('ZRANGE', idx, 0, -1)) do
  if sid ~= keep then
    n = n + redis.call('DEL', base .. SESSION_PART .. sid)
    redis.call('ZREM', idx, sid)
  end
end
index_expire(idx)
if ARGV[3] == '1' then
  for _, room in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    redis.call('DEL', base .. CHAT_PART .. ARGV[4] .. ':' .. room)
  end
  redis.call('DEL', KEYS[2])
end
return n
